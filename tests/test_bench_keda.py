"""bench.keda replays KEDA's and the HPA's decisions as the ScaledObject configures them."""

from __future__ import annotations

from dataclasses import replace

from bench.keda import KedaController, ScalingPolicy

POLICY = ScalingPolicy(
    list_length=4,
    max_replicas=3,
    cooldown_s=20,
    initial_cooldown_s=30,
    scale_down_window_s=30,
    scale_down_pods=1,
    scale_down_period_s=10,
)


def test_an_idle_pool_stays_at_zero_and_one_queued_job_wakes_it() -> None:
    keda = KedaController(POLICY, started_at=0)
    assert keda.desired(1, count=0, current=0) == 0
    assert keda.desired(2, count=1, current=0) == 1


def test_replicas_follow_the_count_over_list_length_up_to_the_maximum() -> None:
    keda = KedaController(POLICY, started_at=0)
    assert keda.desired(1, count=5, current=1) == 2
    assert keda.desired(2, count=12, current=2) == 3
    assert keda.desired(3, count=40, current=3) == 3


def test_a_count_within_the_tolerance_changes_nothing() -> None:
    keda = KedaController(replace(POLICY, max_replicas=10), started_at=0)
    assert keda.desired(1, count=13, current=3) == 3  # 13 / 12: within 10%, not ceil(13/4) = 4
    assert keda.desired(2, count=14, current=3) == 4  # 14 / 12: past it


def test_scale_down_waits_for_the_window_and_removes_one_pod_a_period() -> None:
    keda = KedaController(POLICY, started_at=0)
    assert keda.desired(100, count=12, current=3) == 3
    assert keda.desired(110, count=1, current=3) == 3  # 3 was recommended 10 s ago
    assert keda.desired(129, count=1, current=3) == 3
    assert keda.desired(131, count=1, current=3) == 2  # window passed: one pod
    assert keda.desired(135, count=1, current=2) == 2  # the next only a period later
    assert keda.desired(141, count=1, current=2) == 1


def test_zero_comes_after_the_cooldown_and_never_before_the_initial_cooldown() -> None:
    keda = KedaController(POLICY, started_at=0)
    assert keda.desired(5, count=1, current=0) == 1
    assert keda.desired(10, count=0, current=1) == 1
    assert keda.desired(26, count=0, current=1) == 1  # 21 s since active, but < initial 30 s
    assert keda.desired(31, count=0, current=1) == 0
    keda = KedaController(POLICY, started_at=0)
    assert keda.desired(40, count=1, current=1) == 1
    assert keda.desired(59, count=0, current=1) == 1  # 19 s since the last job
    assert keda.desired(60, count=0, current=1) == 0
