"""A schema-driven fuzz of the whole API: schemathesis generates requests from the gateway's
own `/openapi.json`, valid and invalid, and sends them with a valid key (every scope) to a
running stack, under every check schemathesis has: no answer may be a 500, every answer must be
one the schema documents (status code, content type, headers and body), valid data must be
accepted and invalid data refused, a method a path lacks must get a 405 with its `Allow` header,
and a route that needs a key must refuse a request without one. Bounded in cases per operation
and in time.

Each run draws a seed of its own and prints it, so that runs explore different cases; to replay
a failure, run it again with `GENQ_FUZZ_SEED=<the seed it printed>`."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from tests import keys
from tests.conftest import TINY_NAME
from tests.procs import running_stack

# Cases per operation and phase, valid and invalid data together.
EXAMPLES = 100
TIMEOUT_S = 600
# Replays a run; genq's own variable, not a setting (common/settings.py, OWN_VARIABLES).
SEED_VARIABLE = "GENQ_FUZZ_SEED"
# Every check runs by default (a `--checks` here would override it); the file turns one off
# where it cannot hold, and says why.
CONFIG = Path(__file__).parent / "schemathesis.toml"


def test_the_api_answers_every_generated_request_as_documented(
    tmp_path: Path, tiny_model_dir: Path, log_dir: Path
) -> None:
    seed = int(os.environ.get(SEED_VARIABLE) or secrets.randbelow(2**32))
    print(f"schemathesis seed {seed} (replay: {SEED_VARIABLE}={seed})")
    report = tmp_path / "schemathesis.json"
    with running_stack(
        tmp_path / "redis",
        log_dir,
        serve=TINY_NAME,
        GENQ_API_KEYS=keys.keys_json(),
        GENQ_MODEL=str(tiny_model_dir),
        GENQ_MODEL_NAME=TINY_NAME,
        # Short generations and waits: every case answers within a second or so.
        GENQ_MAX_NEW_TOKENS_LIMIT="16",  # OpenAI's default max_tokens
        GENQ_DEFAULT_MAX_NEW_TOKENS="4",
        GENQ_SYNC_TIMEOUT_S="5",
        GENQ_MAX_SYNC_TIMEOUT_S="5",
        GENQ_CANCEL_WAIT_S="1",
        GENQ_MAX_PROMPT_CHARS="2000",
        GENQ_MAX_BATCH_REQUESTS="4",
    ) as (_, base, _):
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "schemathesis.cli",
                "--config-file",
                str(CONFIG),
                "run",
                f"{base}/openapi.json",
                "--header",
                f"Authorization: Bearer {keys.OPERATOR}",
                "--mode",
                "all",
                "--phases",
                "examples,coverage,fuzzing",
                "--max-examples",
                str(EXAMPLES),
                "--seed",
                str(seed),
                # One thread: Hypothesis parses lambda sources with `ast`, which CPython 3.11
                # does not guard across threads ("AST constructor recursion depth mismatch").
                "--workers",
                "1",
                "--request-timeout",
                "30",
                "--generation-database",
                "none",
                "--suppress-health-check",
                "all",
                "--no-color",
                # The keys are this test's own. Sanitising would hide every field named like a
                # secret (`tokens`, `max_tokens`), leaving a failure unreadable.
                "--output-sanitize",
                "false",
                "--report",
                "json",
                "--report-json-path",
                str(report),
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
            cwd=tmp_path,  # its crash cache (.schemathesis/) stays out of the checkout
        )
    (log_dir / "schemathesis.txt").write_text(run.stdout + run.stderr)
    print(run.stdout[-3000:])
    replay = f"replay with {SEED_VARIABLE}={seed}\n"
    assert run.returncode == 0, replay + run.stdout[-20000:] + run.stderr[-4000:]
    assert report.exists()
