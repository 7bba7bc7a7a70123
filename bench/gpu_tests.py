"""The static decode path's checks on a CUDA device, with real CUDA graphs: the part `tests` of
`bench/gpu_check.py`. The same checks as `tests/test_static_decode.py` runs on the CPU (tiny
model, fp32, so that tokens compare exactly with `model.generate`), plus what only a GPU shows:
a replayed graph gives the logits of the same step run eagerly, the cache sized from a fraction
of the GPU's memory stays within it, and torch.compile under the graphs.

Each check runs on its own and its outcome ("ok", or the error) goes to `results`; a check that
would start past `deadline` (time.monotonic()) is skipped. Without a CUDA device (to try the
script), the checks run on the CPU with the decode steps run eagerly where graphs would replay,
and the GPU-only ones are skipped.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench import shapes
from common.settings import Settings
from tests import static_checks
from tests.engine_driver import reference, run
from tests.tiny_model import build_tiny_model
from worker.engine.config import DecodeConfig, describe
from worker.engine.memory import kv_bytes_per_token
from worker.engine.model import LoadedModel
from worker.engine.static.cache import ACTIVATION_RESERVE_BYTES, StaticCache, geometry
from worker.engine.static.decoder import StaticDecoder
from worker.engine.static.graphs import CudaGraphRunner, cuda_graph_runner
from worker.loading import load_model


def run_all(
    deadline: float,
    tokenizer_dir: Path | None,
    say: Callable[[str], None],
    on_result: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    base = cuda_graph_runner if cuda else static_checks.eager_runner
    graphs = DecodeConfig(static="on", graph_runner=None if cuda else base)

    def check(name: str, fn: Callable[[], str | None], gpu_only: bool = False) -> None:
        if gpu_only and not cuda:
            results[name] = "skipped: no CUDA device"
        elif time.monotonic() > deadline:
            results[name] = "skipped: out of time"
        else:
            started = time.perf_counter()
            try:
                detail = fn()
                results[name] = f"ok ({detail})" if detail else "ok"
            except Exception as e:
                results[name] = f"FAILED: {describe(e)}"
            results[f"{name}_s"] = round(time.perf_counter() - started, 1)
        say(f"{name}: {results[name]}")
        on_result(results)

    with tempfile.TemporaryDirectory() as where:
        path = build_tiny_model(Path(where) / "tiny")
        tiny = load_model(Settings(model=str(path), device=device, dtype="float32"))
        check(
            "greedy_equals_generate",
            lambda: static_checks.check_greedy_equals_generate(tiny, graphs),
        )
        check(
            "padding_never_changes_a_row",
            lambda: static_checks.check_padding_never_changes_a_row(tiny, graphs),
        )
        check(
            "seeded_rows_alone_and_in_a_batch",
            lambda: static_checks.check_seeded_rows_alone_and_in_a_batch(tiny, graphs),
        )
        check(
            "decode_steps_replay_graphs_both_prefill_modes",
            lambda: static_checks.check_decode_steps_go_through_the_runner(tiny, base),
        )
        check(
            "graph_failing_at_run_time_fails_no_request",
            lambda: static_checks.check_a_runner_failing_at_run_time_fails_no_request(tiny, base),
        )
        check(
            "graph_failing_at_start_up_fails_no_request",
            lambda: static_checks.check_a_runner_failing_at_start_up_fails_no_request(tiny, base),
        )
        small: list[LoadedModel] = []

        def build_small() -> None:
            small.append(shapes.build("smollm2-135m", Settings(), 4, tokenizer_dir))

        check("build_smollm2_135m_4_layers", build_small, gpu_only=True)
        if small:
            check("replay_equals_eager_bf16", lambda: check_replay_equals_eager(small[0]))
            check("memory_fraction_bounds_the_cache", lambda: check_memory_fraction(small[0]))
        compiled = replace(tiny, compile=True)
        check(
            "compiled_and_captured_equals_generate",
            lambda: check_compiled(compiled, graphs),
            gpu_only=True,
        )
    return results


def check_replay_equals_eager(lm: LoadedModel) -> str:
    """Every bucket's graph, replayed on a cache of random keys and values and rows at random
    positions (some rows padding), gives the logits of the same step run eagerly: the same best
    token, within bf16 rounding (how many buckets were bitwise equal is reported)."""
    shape = geometry(lm, 16, 16 * 512, 0.0, kv_bytes_per_token(lm))
    decoder = StaticDecoder(lm, shape, DecodeConfig(static="on", cuda_graphs=False))
    state = decoder.state
    generator = torch.Generator(device=lm.device).manual_seed(0)
    with torch.inference_mode():
        state.cache.kv.normal_(generator=generator)
        state.cache.kv.mul_(0.5)
        state.tokens.random_(0, int(lm.model.config.vocab_size), generator=generator)
        state.slots.all_positions.random_(0, 120, generator=generator)
        state.live.fill_(11)  # rows 11.. are padding: they write the scratch column only
        runner = CudaGraphRunner(decoder.decode_step, lm.device)
        runner.prepare(decoder.shapes())
        compared = bitwise = 0
        for rows, length in decoder.shapes():  # every length bucket holds positions below 120
            decoder.decode_step(rows, length)
            eager = state.logits[:rows].clone()
            state.logits.zero_()
            runner.run(rows, length)
            torch.cuda.synchronize()
            replayed = state.logits[:rows]
            compared += 1
            bitwise += bool(torch.equal(replayed, eager))
            live = min(rows, 11)
            assert torch.equal(replayed[:live].argmax(-1), eager[:live].argmax(-1)), (rows, length)
            torch.testing.assert_close(replayed, eager, rtol=2e-2, atol=2e-2)
    return f"{compared} buckets, {bitwise} bitwise equal"


def check_memory_fraction(lm: LoadedModel) -> str:
    """A cache sized from half the GPU's memory keeps the process's allocation under half."""
    total = torch.cuda.get_device_properties(lm.device).total_memory
    shape = geometry(lm, 64, 0, 0.5, kv_bytes_per_token(lm))
    cache = StaticCache(lm, shape)
    used = torch.cuda.memory_allocated(lm.device)
    logits = 64 * int(lm.model.config.vocab_size) * 4
    assert used + ACTIVATION_RESERVE_BYTES + logits <= 0.5 * total, (used, total)
    assert shape.columns == lm.max_context or used > 0.4 * total, (shape, used, total)
    del cache
    gib = 2**30
    return (
        f"{shape.slots} slots x {shape.columns} tokens, {used / gib:.1f} of {total / gib:.1f} GiB"
    )


def check_compiled(lm: LoadedModel, graphs: DecodeConfig) -> None:
    """torch.compile'd decode steps, captured as graphs, still give generate's tokens."""
    out = run(lm, static_checks.mixed_jobs(), static_checks.LIMITS, decode=graphs)
    mode = static_checks.mode_of(out)
    assert mode.label == "cuda_graphs+compiled", mode
    got = static_checks.tokens(out)
    for job in static_checks.mixed_jobs():
        expected = reference(lm, job.prompt, job.params.max_new_tokens)
        assert got[job.id] == expected, job.id
