"""`python -m bench.report` runs end to end (a short run on the tiny model): every system and
route answers every request, and the docs section it writes carries the tables, the targets with
the verdicts the figures give, and the plots. A short run on a shared machine may miss a target:
what is checked is that each verdict is the one its figures give, never that the goal is met."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench.report import Figures, targets


def test_a_short_report_measures_every_system_and_writes_its_section(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nText the report must keep.\n")
    command = [
        sys.executable, "-m", "bench.report", "--model", str(tiny_model_dir),
        "--duration", "2", "--warmup", "1", "--concurrency", "1,16", "--batch-sizes", "16",
        "--write-docs", "--docs", str(docs), "--json", "--work", str(tmp_path / "work"),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr.decode()[-4000:]

    results = orjson.loads(done.stdout.splitlines()[-1])
    assert [f["concurrency"] for f in results["sweep"]] == [1, 16]
    routes = [f["route"] for f in results["routes"]]
    assert routes == ["openai stream", "native SSE", "sync", "poll"]
    for series in ("sweep", "engine", "plain", "routes", "batch"):
        for figures in results[series]:
            assert figures["error_rate"] == 0.0, (series, figures)
            assert figures["tokens_per_s"] > 0, (series, figures)
    assert all(f["ttft_s"]["p50"] > 0 for f in results["sweep"] + results["engine"])

    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\nText the report must keep.\n")
    section = text[text.index("<!-- bench.report cpu: begin -->") :]
    assert section.rstrip().endswith("<!-- bench.report cpu: end -->")
    # Each target: its value from the figures, and its verdict from the value, in the docs too.
    at = {s: {f["concurrency"]: f for f in results[s]} for s in ("sweep", "engine", "plain")}
    ttft_gap = at["sweep"][1]["ttft_s"]["p50"] - at["engine"][1]["ttft_s"]["p50"]
    expected = [
        at["sweep"][16]["tokens_per_s"] / at["engine"][16]["tokens_per_s"],
        at["sweep"][16]["tokens_per_s"] / at["plain"][16]["tokens_per_s"],
        at["sweep"][1]["tokens_per_s"] / at["plain"][1]["tokens_per_s"],
        ttft_gap,
    ]
    assert [t["value"] for t in results["targets"]] == pytest.approx(expected)
    for target in results["targets"]:
        reached = (
            target["value"] <= target["goal"]
            if target["at_most"]
            else (target["value"] >= target["goal"])
        )
        assert target["met"] == reached, target
        verdict = "met" if reached else "missed"
        line = next(x for x in section.splitlines() if x.startswith(f"- {target['name']}: "))
        assert line.endswith(f"({verdict})"), (line, target)
    assert "| 16 |" in section
    for image in ("report-concurrency-cpu.png", "report-routes-batch-cpu.png"):
        assert f"({image})" in section
        assert (tmp_path / image).read_bytes().startswith(b"\x89PNG")


def figures(system: str, concurrency: int, tokens_per_s: float, ttft_p50_s: float) -> Figures:
    return Figures(
        system=system,
        route="r",
        concurrency=concurrency,
        requests_per_s=1.0,
        tokens_per_s=tokens_per_s,
        error_rate=0.0,
        ttft_s={"p50": ttft_p50_s},
        itl_s=None,
        e2e_s={"p50": 1.0},
        requests=1,
    )


@pytest.mark.parametrize(
    ("stack_per_s", "stack_ttft_s", "verdicts"),
    [
        # 16 clients: 95 of the engine's 100 and 19x the plain app's 5; 1 client: the plain
        # app's rate; TTFT 20 ms over the engine's.
        ((95.0, 10.0), 0.12, [True, True, True, True]),
        # 16 clients: 85 (0.85x the engine, 17x the plain app); 1 client: 0.9x; TTFT +30 ms.
        ((85.0, 9.0), 0.13, [False, True, False, False]),
        ((20.0, 10.0), 0.10, [False, False, True, True]),  # 4x the plain app at 16
    ],
)
def test_each_target_is_met_or_missed_as_its_figures_say(
    stack_per_s: tuple[float, float], stack_ttft_s: float, verdicts: list[bool]
) -> None:
    at16, at1 = stack_per_s
    results = {
        "sweep": [figures("genq", 16, at16, 0.5), figures("genq", 1, at1, stack_ttft_s)],
        "engine": [figures("engine", 16, 100.0, 0.5), figures("engine", 1, 12.0, 0.1)],
        "plain": [figures("plain", 16, 5.0, 0.5), figures("plain", 1, 10.0, 0.1)],
        "routes": [],
        "batch": [],
    }
    found = targets(results)
    assert [t.met for t in found] == verdicts
    for target, met in zip(found, verdicts, strict=True):
        assert target.line().endswith("(met)" if met else "(missed)")
