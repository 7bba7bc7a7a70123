"""Reading a Prometheus exposition in tests (scrape, act, scrape, compare), and the metrics
docs/observability.md documents."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    """Every sample of one scrape, by name and labels, and the families' names."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    families: frozenset[str]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples named `name` whose labels include `labels` (0 if none)."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def has(self, name: str, **labels: str) -> bool:
        wanted = set(labels.items())
        return any(n == name and wanted <= ls for n, ls in self.samples)


def parse(text: str) -> Scrape:
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    families = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, frozenset(families))


def scrape(url: str) -> Scrape:
    return parse(httpx.get(url, timeout=10).text)


@dataclass(frozen=True)
class Documented:
    kind: str  # counter, gauge, histogram
    labels: frozenset[str]
    processes: frozenset[str]  # gateway, worker


def documented_metrics() -> dict[str, Documented]:
    """The metrics table of docs/observability.md, by metric name as exposed."""
    doc = (Path(__file__).parent.parent / "docs" / "observability.md").read_text()
    rows = re.findall(r"^\| `(genq_\w+)` \| (\w+) \| ([^|]+) \| ([^|]+) \|", doc, re.M)
    return {
        name: Documented(
            kind,
            frozenset(x.strip() for x in labels.split(",") if x.strip() not in ("", "\N{EN DASH}")),
            frozenset(x.strip() for x in processes.split(",")),
        )
        for name, kind, labels, processes in rows
    }
