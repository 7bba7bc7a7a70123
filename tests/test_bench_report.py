"""`python -m bench.report` runs end to end (a short run on the tiny model): every system and
route answers every request, and the docs section it writes carries the tables, the targets and
the plots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson


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
    assert "stack >= 0.9 x engine alone" in section
    assert "| 16 |" in section
    for image in ("report-concurrency-cpu.png", "report-routes-batch-cpu.png"):
        assert f"({image})" in section
        assert (tmp_path / image).read_bytes().startswith(b"\x89PNG")
