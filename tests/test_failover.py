"""The failover drill (`bench.failover`), short: the Redis primary killed under load and
Sentinel promoting its replica. Every accepted job ends once and succeeds, and every stream,
resumed across the failover, reads as its job's result."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.failover import FailoverStack, drill, report
from tests.conftest import TINY_NAME


def test_a_primary_killed_under_load_loses_no_acknowledged_job(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, log_dir: Path
) -> None:
    stack = FailoverStack(
        tmp_path_factory.mktemp("failover"),
        log_dir,
        GENQ_MODEL=str(tiny_model_dir),
        GENQ_MODEL_NAME=TINY_NAME,
        GENQ_CACHE_ENABLED="false",
    )
    try:
        body = {"prompt": "Once", "max_new_tokens": 120, "temperature": 1.0}
        result = drill(stack, jobs=40, clients=4, body=body)
    finally:
        stack.close()
    print(report(result))
    assert result.exited == []
    assert result.first_accepted_s is not None  # jobs were accepted after the kill
    assert result.accepted >= 40
    assert result.streams_resumed > 0  # streams were open at the kill, and went on
    assert result.lost == 0
    assert result.doubled == 0
    assert result.failed == 0
    assert result.succeeded == result.accepted
    assert result.streams_equal == result.accepted
