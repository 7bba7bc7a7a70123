"""The engine's own cost, apart from the model: `python -m bench.engine --overhead [--json]`.

A randomly initialised Llama of 2 layers and hidden size 64 with the tests' 400-token
vocabulary, whose forward pass is negligible, decodes 1, 16, 64 and 256 rows at once, with short
distinct prompts and end-of-sequence ignored. The rows take turns at what API traffic asks for
(`KINDS`): greedy, sampled at the API's default temperature, sampled with top-k and top-p, and
greedy with a stop string that never matches. Each row count runs its rows for `WARM_STEPS`
steps, then times `TIMED_STEPS` decode steps, including the time the text side takes to hand
those steps' outputs on; the best of `REPEATS` runs counts. `step_overhead_ms` is the time of a
step at 1 row, `row_overhead_us` the slope of a least-squares line through the step times over
the row counts. The same figures for greedy rows alone come as `*_greedy`.

Torch runs on one thread: the tiny model's operations are too small to gain from more, and on a
machine whose cores are shared an operation split across threads waits for the slowest of them,
which measures the neighbours, not the engine.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from common.settings import Settings
from gateway.schemas import GenerationRequest
from tests.tiny_model import build_tiny_model
from worker import metrics
from worker.engine import Engine, EngineLimits, EngineRequest, RowOutput
from worker.engine.model import LoadedModel
from worker.engine.sampling import SamplingParams
from worker.loading import load_model

ROW_COUNTS = (1, 16, 64, 256)
WARM_STEPS = 4
TIMED_STEPS = 32
REPEATS = 3
TINY_SHAPE: dict[str, object] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}


def tiny_model(device: str) -> LoadedModel:
    with tempfile.TemporaryDirectory() as where:
        path = build_tiny_model(Path(where), config=TINY_SHAPE)
        return load_model(Settings(model=str(path), device=device))


def kinds(max_new_tokens: int) -> list[SamplingParams]:
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    return [
        greedy,
        replace(greedy, temperature=1.0),
        replace(greedy, temperature=0.8, top_k=40, top_p=0.9),
        replace(greedy, stop=("never in this text",)),
    ]


def _ignore(outputs: list[RowOutput]) -> None:
    del outputs


def step_ms(lm: LoadedModel, rows: int, mixed: bool) -> float:
    """Milliseconds per decode step with `rows` rows running."""
    limits = EngineLimits(
        max_batch_size=rows,
        max_batch_tokens=2**30,
        max_prefill_tokens=2**30,
        prefix_cache_bytes=0,
    )
    engine = Engine(lm, limits, _ignore, on_stats=metrics.EngineMetrics())
    params = kinds(WARM_STEPS + TIMED_STEPS + 2)
    for i in range(rows):
        request = GenerationRequest(prompt=f"{i} Hi there")
        row_params = replace(params[i % len(params)], seed=i) if mixed else params[0]
        engine.submit(EngineRequest(str(i), request, row_params, float("inf")))
    try:
        engine.step()  # admits and prefills every row
        assert engine.running == rows, "every row runs from the first step"
        for _ in range(WARM_STEPS):
            engine.step()
        engine.flush()
        started = time.perf_counter()
        for _ in range(TIMED_STEPS):
            engine.step()
        engine.flush()
        elapsed = time.perf_counter() - started
    finally:
        engine.stop()
    return 1000 * elapsed / TIMED_STEPS


def measure(device: str) -> dict[str, object]:
    torch.set_num_threads(1)
    lm = tiny_model(device)
    step_ms(lm, 16, mixed=True)  # warm-up: lazy initialisation of kernels and the tokenizer
    figures: dict[str, object] = {"device": str(lm.device)}
    for mixed, suffix in ((True, ""), (False, "_greedy")):
        by_rows = {
            rows: min(step_ms(lm, rows, mixed) for _ in range(REPEATS)) for rows in ROW_COUNTS
        }
        slope, _ = statistics.linear_regression(list(by_rows), list(by_rows.values()))
        figures |= {
            f"step_ms_by_rows{suffix}": {str(rows): ms for rows, ms in by_rows.items()},
            f"step_overhead_ms{suffix}": by_rows[1],
            f"row_overhead_us{suffix}": 1000 * slope,
        }
    return figures
