"""KEDA's scaling decision for a `redis` trigger, as `bench.autoscale` replays it.

What KEDA and the HorizontalPodAutoscaler it creates do with the ScaledObject in
`k8s/base/keda.yaml`, reduced to one function of time, the queue count and the replicas:

- at zero replicas, a count above `activationListLength` scales to one (KEDA's activation);
- the count at or below it for `cooldownPeriod` (and not before `initialCooldownPeriod` after
  the start) scales to zero;
- otherwise the HPA's AverageValue rule: replicas = ceil(count / listLength), between one and
  `maxReplicaCount`, left alone within the HPA's 10% tolerance; up at once, down to the highest
  recommendation of the stabilisation window, at most `scale_down_pods` per period.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class ScalingPolicy:
    list_length: int
    max_replicas: int
    cooldown_s: float
    initial_cooldown_s: float
    scale_down_window_s: float
    scale_down_pods: int
    scale_down_period_s: float
    activation_list_length: int = 0
    tolerance: float = 0.1  # the HPA's default


class KedaController:
    def __init__(self, policy: ScalingPolicy, started_at: float) -> None:
        self.policy = policy
        self.started_at = started_at
        self._last_active: float | None = None
        self._recommendations: deque[tuple[float, int]] = deque()
        self._scale_downs: deque[tuple[float, int]] = deque()

    def desired(self, now: float, count: int, current: int) -> int:
        p = self.policy
        active = count > p.activation_list_length
        if active:
            self._last_active = now
        if current == 0:
            return 1 if active else 0
        if not active and self._cooled_down(now):
            self._recommendations.clear()
            return 0
        return self._hpa(now, count, current)

    def _cooled_down(self, now: float) -> bool:
        p = self.policy
        if now - self.started_at < p.initial_cooldown_s:
            return False
        return self._last_active is None or now - self._last_active >= p.cooldown_s

    def _hpa(self, now: float, count: int, current: int) -> int:
        p = self.policy
        if abs(count / (current * p.list_length) - 1) <= p.tolerance:
            wanted = current
        else:
            wanted = math.ceil(count / p.list_length)
        wanted = min(max(wanted, 1), p.max_replicas)
        self._recommendations.append((now, wanted))
        while self._recommendations[0][0] < now - p.scale_down_window_s:
            self._recommendations.popleft()
        if wanted >= current:
            return wanted
        stabilized = max(r for _, r in self._recommendations)
        if stabilized >= current:
            return current
        while self._scale_downs and self._scale_downs[0][0] <= now - p.scale_down_period_s:
            self._scale_downs.popleft()
        allowed = p.scale_down_pods - sum(n for _, n in self._scale_downs)
        target = max(stabilized, current - max(allowed, 0))
        if target < current:
            self._scale_downs.append((now, current - target))
        return target
