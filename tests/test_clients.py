"""Off-the-shelf clients against a stack serving the default model.

lm-evaluation-harness scores a multiple-choice task through /v1/completions (token-id prompts,
echo, logprobs) as its `hf` backend scores it on the same checkpoint; guidellm's documented
benchmark streams chat completions with continuous usage stats, without an errored request.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lm_eval
import orjson
import pytest
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from common.settings import DEFAULT_MODEL_NAME

TASKS_DIR = Path(__file__).parent / "data" / "lm_eval"
TASK = "genq_facts"
# Both sides run the model in fp32 on the CPU: batching and kernels (genq's oneDNN LM head) move
# only the last digits (under 2e-5 here), where one wrong token or position moves whole units.
LOGLIK_TOLERANCE = 1e-3
GUIDELLM_STREAMS = 4
GUIDELLM_REQUESTS = 8


def test_lm_eval_scores_the_same_through_completions_as_on_the_model(
    default_stack: str, default_checkpoint: Path
) -> None:
    reference = _evaluate(
        HFLM(pretrained=str(default_checkpoint), device="cpu", dtype="float32", batch_size=8)
    )
    served = _evaluate(
        "local-completions",
        {
            "base_url": f"{default_stack}/v1/completions",
            "model": DEFAULT_MODEL_NAME,
            "tokenizer": str(default_checkpoint),
            "tokenizer_backend": "huggingface",
            # Four prompts a request (a list of token-id lists), two requests at a time.
            "batch_size": 4,
            "num_concurrent": 2,
            "max_retries": 1,
            "timeout": 120,
        },
    )

    assert served["results"][TASK]["acc,none"] == reference["results"][TASK]["acc,none"]
    got, want = _choices(served), _choices(reference)
    assert got.keys() == want.keys()
    for key, (loglik, greedy) in want.items():
        assert got[key][0] == pytest.approx(loglik, abs=LOGLIK_TOLERANCE), key
        assert got[key][1] == greedy, key


def test_guidellm_benchmarks_streamed_chat_without_an_error(
    default_stack: str, default_checkpoint: Path, tmp_path: Path
) -> None:
    report = tmp_path / "benchmarks.json"
    # README's "Run Your First Benchmark" at a fixed concurrency, ended by a request count (a
    # deadline would cut requests off, however slow the machine); the duration only guards.
    command = [
        sys.executable,
        "-m",
        "guidellm",
        "run",
        "--backend",
        f"kind=openai_http,target={default_stack}",
        "--profile",
        f"kind=concurrent,streams={GUIDELLM_STREAMS}",
        "--constraint",
        f"kind=max_requests,count={GUIDELLM_REQUESTS}",
        "--constraint",
        "kind=max_duration,seconds=60",
        "--data",
        "kind=synthetic_text,prompt_tokens=64,output_tokens=16",
        # Synthetic prompts are cut to length with the model's tokenizer.
        "--tokenizer",
        f"kind=huggingface_auto,model={default_checkpoint}",
        "--output",
        f"kind=json,path={report}",
        "--disable-console",
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        # One process sends every stream: its default of up to ten competes with the model for CPUs.
        "GUIDELLM__MAX_WORKER_PROCESSES": "1",
    }
    run = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]

    (benchmark,) = orjson.loads(report.read_bytes())["benchmarks"]
    errors = [r["info"]["error"] for r in benchmark["requests"]["errored"][:3]]
    assert benchmark["metrics"]["request_totals"] == {
        "successful": GUIDELLM_REQUESTS,
        "errored": 0,
        "incomplete": 0,
        "total": GUIDELLM_REQUESTS,
    }, errors
    # It asks for 16 tokens past any end of sequence, and takes a request's count from the usage
    # its stream ends with (none without one).
    counted = [r["output_metrics"]["text_tokens"] for r in benchmark["requests"]["successful"]]
    assert counted == [16] * GUIDELLM_REQUESTS


def _evaluate(model: str | HFLM, model_args: dict[str, Any] | None = None) -> dict[str, Any]:
    results: dict[str, Any] = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        log_samples=True,
        bootstrap_iters=0,
    )
    return results


def _choices(results: dict[str, Any]) -> dict[tuple[int, int], tuple[float, bool]]:
    """Each (document, choice)'s log-likelihood and whether it is the greedy continuation."""
    return {
        (sample["doc_id"], i): (float(loglik), bool(greedy))
        for sample in results["samples"][TASK]
        for i, (loglik, greedy) in enumerate(sample["filtered_resps"])
    }
