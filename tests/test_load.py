"""The locust load test (tests/load_test.py) runs headless against the test stack: every user
class, every answer checked, no failure."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from tests.conftest import Stack

USERS = ["SubmitPollUser", "SyncUser", "StreamUser", "OpenAIStreamUser", "BatchUser"]


def test_the_load_test_runs_without_a_failure(stack: Stack, tmp_path: Path) -> None:
    prefix = tmp_path / "load"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(Path(__file__).with_name("load_test.py")),
            "--headless",
            "--host",
            stack.base,
            "--users",
            str(len(USERS)),
            "--spawn-rate",
            str(len(USERS)),
            "--run-time",
            "8s",
            "--stop-timeout",
            "30",
            "--max-new-tokens",
            "4-12",
            "--csv",
            str(prefix),
            "--only-summary",
            *USERS,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = run.stdout[-4000:] + run.stderr[-4000:]
    with (tmp_path / "load_stats.csv").open() as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    total = rows[("", "Aggregated")]
    assert int(total["Failure Count"]) == 0, output
    # An exception in a task is no failed request, but the user's checks never ran.
    with (tmp_path / "load_exceptions.csv").open() as f:
        assert list(csv.DictReader(f)) == [], output
    assert run.returncode == 0, output
    assert int(total["Request Count"]) > 0
    kinds = {kind for kind, _ in rows}
    # Every user class sent requests, and the streams reported their latencies.
    assert {"POST", "GET", "TTFT", "ITL"} <= kinds
    named = {name for _, name in rows}
    for route in (
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/events",
        "/v1/generate",
        "/v1/jobs/batch",
        "/v1/chat/completions (stream)",
    ):
        assert route in named, named
