"""The fault suite: real processes and a real Redis under load from careful clients (see
`bench.faults`), one fault at a time. No genq process may exit unless the fault is its own exit;
every accepted job must end exactly once, succeeded (but the poisoned one, which must fail with
its own code while the jobs beside it succeed), with a stream equal to its result."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.faults import FAULTS, Stack, run_fault
from tests.conftest import TINY_NAME

# With logprobs: a stream resumed over a re-run must carry the same ones as the result.
BODY: dict[str, object] = {
    "prompt": "Once",
    "max_new_tokens": 120,
    "temperature": 1.0,
    "logprobs": 1,
}
# What the injection itself reports: the poisoned job's end, the exit of the process it ended.
EXPECTED_NOTE = {
    "poison": "the poisoned job ended failed (numerical_error)",
    "worker-kill": "worker exit -9",
    "worker-term": "worker exit 0",
    "engine-dies": "worker exit 3",
    "step-hangs": "worker exit 3",
    "loop-blocks": "worker exit 3",
}
# Why the watchdog tripped, for the faults that make it.
TRIPPED = {
    "engine-dies": "cannot go on: the engine thread died: SystemExit('injected",
    "step-hangs": "watchdog: an engine step of",
    "loop-blocks": "watchdog: the event loop has not run for",
    "gateway-term": "gateway exit 0",
}
# Faults that take down the worker running the jobs: some of them must run again elsewhere.
WORKER_LOST = ("worker-kill", "engine-dies", "step-hangs", "loop-blocks")


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, log_dir: Path
) -> Iterator[Stack]:
    stack = Stack(
        tmp_path_factory.mktemp("faults"),
        log_dir,
        GENQ_MODEL=str(tiny_model_dir),
        GENQ_MODEL_NAME=TINY_NAME,
        GENQ_CACHE_ENABLED="false",
    )
    yield stack
    stack.close()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_the_service_rides_out_the_fault(stack: Stack, fault: str) -> None:
    outcome = run_fault(stack, fault, clients=3, body=BODY, settle_s=1.0)
    print(outcome)
    assert outcome.exited == []
    assert outcome.accepted > 0
    # Only the fault's own victim fails (the poisoned job, with `numerical_error`).
    assert outcome.failed == FAULTS[fault].fails
    assert outcome.succeeded == outcome.accepted - sum(outcome.failed.values())
    assert outcome.lost == 0
    assert outcome.doubled == 0
    assert outcome.stream_differs == 0
    assert outcome.recovery_s is not None
    if fault in EXPECTED_NOTE:
        assert EXPECTED_NOTE[fault] in outcome.clients_saw
    if fault in TRIPPED:
        assert TRIPPED[fault] in outcome.clients_saw
    if fault in WORKER_LOST:
        assert outcome.rerun > 0
