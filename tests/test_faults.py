"""The fault suite: real processes and a real Redis under load from careful clients (see
`bench.faults`), one fault at a time. No genq process may exit unless the fault is its own exit,
and no accepted job may be lost or end twice."""

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
# What the injection itself reports, for the faults that end a process.
EXPECTED_NOTE = {
    "poisoned request among running jobs": "the poisoned job ended succeeded",
    "worker SIGKILL mid-job": "worker exit -9",
    "worker SIGTERM mid-job": "worker exit 0",
    "engine thread dies": "worker exit 3",
    "gateway SIGTERM with open streams": "gateway exit 0",
}


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
    assert outcome.lost == 0
    assert outcome.doubled == 0
    assert outcome.recovery_s is not None
    if fault in EXPECTED_NOTE:
        assert EXPECTED_NOTE[fault] in outcome.clients_saw
