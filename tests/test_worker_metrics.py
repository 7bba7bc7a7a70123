"""The worker's metric helpers in-process: the memory read at scrape time, the engine step's
series, and the labels a finished job is counted under."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common.jobs import Job, JobError, JobStatus
from worker import metrics
from worker.engine import StepStats


def memory(collector: metrics.MemoryCollector) -> dict[str, float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_memory_limit_is_crossed_when_usage_passes_it() -> None:
    cpu = torch.device("cpu")
    under = memory(metrics.MemoryCollector(cpu, limit_bytes=2**50))
    assert under["genq_worker_memory_limit_bytes"] == 2**50
    assert under["genq_worker_memory_limit_exceeded"] == 0
    over = memory(metrics.MemoryCollector(cpu, limit_bytes=1))
    assert over["genq_worker_memory_limit_exceeded"] == 1
    assert over["genq_worker_memory_usage_bytes"] == over["genq_worker_rss_bytes"] > 1


def test_without_a_setting_the_limit_is_the_container_s(tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    v2.write_text("max\n")  # cgroup v2 without a limit
    v1.write_text(f"{2**40}\n")
    assert (
        memory(metrics.MemoryCollector(cpu, 0, [v2, v1]))["genq_worker_memory_limit_bytes"] == 2**40
    )
    v1.write_text(f"{2**63 - 4096}\n")  # cgroup v1 without a limit
    read = memory(metrics.MemoryCollector(cpu, 0, [v2, v1, tmp_path / "absent"]))
    assert "genq_worker_memory_limit_bytes" not in read
    assert "genq_worker_memory_limit_exceeded" not in read


def step(model: str, rows: int) -> StepStats:
    return StepStats(
        model=model,
        seconds=0.01,
        rows=rows,
        tokens=rows * 3,
        running=rows,
        waiting=2,
        waiting_for_memory=1,
        kv_tokens=300,
        kv_budget=1000,
        prefix_queries=40,
        prefix_hits=16,
        prefix_cache_bytes=4096,
    )


def test_a_step_sets_the_engine_series_and_a_gone_model_drops_its_gauges() -> None:
    model = "unit@1"
    labels = dict(zip(("pool", "model"), metrics.labels(model), strict=True))
    series = metrics.EngineMetrics()
    series(step(model, rows=0))  # an idle step: gauges only
    assert sample("genq_engine_step_duration_seconds_count", labels) == 0
    series(step(model, rows=4))
    assert sample("genq_engine_step_duration_seconds_count", labels) == 1
    assert sample("genq_kv_cache_usage_ratio", labels) == 0.3
    assert sample("genq_engine_rows_waiting_for_memory", labels) == 1
    assert sample("genq_prefix_cache_hits_total", labels) == 32  # 16 per step that looked
    assert sample("genq_worker_prefix_cache_bytes", labels) == 4096
    series.close()
    assert sample("genq_requests_running", labels) is None
    assert sample("genq_kv_cache_usage_ratio", labels) is None


def sample(name: str, labels: dict[str, str]) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_a_failure_is_counted_under_a_known_error_code() -> None:
    now = time.time()
    job = Job(
        id="j",
        status=JobStatus.failed,
        model="unit@1",
        created_at=now - 1,
        finished_at=now,
        error=JobError(code="something_new", message="?"),
    )
    labels = {"pool": metrics.labels("unit@1")[0], "model": "unit@1", "code": "generation_failed"}
    before = sample("genq_requests_failed_total", labels) or 0
    metrics.observe_finish(job, None)
    assert sample("genq_requests_failed_total", labels) == before + 1
