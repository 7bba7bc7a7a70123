"""The static decode path on the CPU: its decode step runs eagerly (or through an injected runner
where CUDA graphs would replay), and gives what `model.generate` and the eager path give.
`bench/gpu_check.py` runs the same checks on a GPU with real CUDA graphs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from common.settings import Settings
from gateway.schemas import GenerationRequest
from tests import static_checks
from tests.engine_driver import PROMPTS, Job, greedy, reference, run
from tests.tiny_model import build_tiny_model
from worker.engine import EngineLimits, fused
from worker.engine.config import DecodeConfig
from worker.engine.eager import compiling
from worker.engine.generation import build_prompt_ids
from worker.engine.model import LoadedModel
from worker.engine.static.cache import CacheTooSmall, geometry
from worker.loading import load_model
from worker.model_manager import decode_config

STATIC = DecodeConfig(static="on")


@pytest.fixture(scope="module", params=sorted(fused.FUSED_MODEL_TYPES))
def fused_lm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), architecture=request.param)
    return load_model(Settings(model=str(path), device="cpu"))


def test_static_decoding_equals_model_generate(fused_lm: LoadedModel) -> None:
    static_checks.check_greedy_equals_generate(fused_lm, STATIC)


def test_padding_to_a_bucket_never_changes_a_row(tiny_lm: LoadedModel) -> None:
    static_checks.check_padding_never_changes_a_row(tiny_lm, STATIC)


def test_seeded_rows_sample_alike_alone_in_a_batch_and_on_the_eager_path(
    tiny_lm: LoadedModel,
) -> None:
    static_checks.check_seeded_rows_alone_and_in_a_batch(tiny_lm, STATIC)


def test_decode_steps_replay_their_bucket_and_prefill_both_ways(tiny_lm: LoadedModel) -> None:
    static_checks.check_decode_steps_go_through_the_runner(tiny_lm, static_checks.eager_runner)


def test_a_graph_failing_at_run_time_falls_back_without_failing_requests(
    tiny_lm: LoadedModel,
) -> None:
    static_checks.check_a_runner_failing_at_run_time_fails_no_request(
        tiny_lm, static_checks.eager_runner
    )


def test_a_graph_failing_at_start_up_falls_back_without_failing_requests(
    tiny_lm: LoadedModel,
) -> None:
    static_checks.check_a_runner_failing_at_start_up_fails_no_request(
        tiny_lm, static_checks.eager_runner
    )


def test_a_model_the_static_path_does_not_cover_runs_eagerly_and_says_why(
    tmp_path: Path,
) -> None:
    # Phi-3 projects queries, keys and values in one matmul: not the Llama layer.
    lm = load_model(
        Settings(model=str(build_tiny_model(tmp_path, architecture="phi3")), device="cpu")
    )
    jobs = [Job(str(i), p, greedy(12), at_step=i) for i, p in enumerate(PROMPTS)]
    out = run(lm, jobs, decode=STATIC)
    mode = static_checks.mode_of(out)
    assert mode.path == "eager"
    assert "static decode path is off" in (mode.note or "")
    assert "phi3" in (mode.note or "")
    for job in jobs:
        assert out.done[job.id].token_ids == reference(lm, job.prompt, 12)


def test_the_cpu_keeps_the_eager_path_unless_asked(tiny_lm: LoadedModel) -> None:
    out = run(tiny_lm, [Job("a", PROMPTS[0], greedy(4))])
    assert static_checks.mode_of(out).label == "eager"
    assert static_checks.mode_of(out).note is None


def test_a_request_longer_than_a_slot_fails_naming_the_limit(tiny_lm: LoadedModel) -> None:
    limits = EngineLimits(max_batch_size=4, max_batch_tokens=4 * 64)
    prompt_tokens = len(build_prompt_ids(tiny_lm, GenerationRequest(prompt=PROMPTS[2])))
    fits = greedy(64 - prompt_tokens)
    jobs = [Job("fits", PROMPTS[2], fits), Job("too-long", PROMPTS[2], greedy(65 - prompt_tokens))]
    out = run(tiny_lm, jobs, limits, decode=STATIC)
    assert out.done["fits"].token_ids == reference(tiny_lm, PROMPTS[2], fits.max_new_tokens)
    message = str(out.errors["too-long"])
    assert "one slot of the KV cache holds (64," in message
    assert "GENQ_MAX_BATCH_TOKENS / GENQ_MAX_BATCH_SIZE" in message


def test_with_graphs_newcomers_wait_to_share_a_prefill(tiny_lm: LoadedModel) -> None:
    wait = 3
    decode = DecodeConfig(
        static="on", graph_runner=static_checks.eager_runner, prefill_wait_steps=wait
    )
    jobs = [
        Job("first", PROMPTS[0], greedy(20)),
        Job("late", PROMPTS[1], greedy(12), at_step=4),
        Job("later", PROMPTS[2], greedy(12), at_step=5),
    ]
    out = run(tiny_lm, jobs, decode=decode)
    # "late" waited `wait` steps from step 4, and "later" joined it in the same prefill.
    assert out.batch_sizes[4 : 4 + wait] == [1] * wait
    assert out.batch_sizes[4 + wait] == 3
    for job in jobs:
        expected = reference(tiny_lm, job.prompt, job.params.max_new_tokens)
        assert out.done[job.id].token_ids == expected


def failing_compiler(fail_after: int) -> Any:
    """A torch.compile backend that compiles (runs the traced graph as it is) `fail_after`
    times, then raises, as inductor did at the first real shape."""
    calls = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        del example_inputs
        calls.append(1)
        if len(calls) > fail_after:
            raise RuntimeError("inductor failed on this shape (injected)")
        return graph.forward

    return backend


def test_a_compile_error_at_a_new_shape_falls_back_to_eager_without_failing_rows(
    tiny_lm: LoadedModel,
) -> None:
    lm = replace(tiny_lm, compile=True)
    decode = DecodeConfig(compile_backend=failing_compiler(fail_after=1))
    jobs = [Job(str(i), p, greedy(12), at_step=i) for i, p in enumerate(PROMPTS)]
    try:
        out = run(lm, jobs, decode=decode)
    finally:
        compiling.uncompile(lm.model)  # the model is the session's
        torch._dynamo.reset()
    mode = static_checks.mode_of(out)
    assert mode.label == "eager"
    assert "torch.compile failed at run time" in (mode.note or "")
    for job in jobs:
        assert out.done[job.id].token_ids == reference(tiny_lm, job.prompt, 12)


def test_a_static_step_that_does_not_compile_runs_eagerly(tiny_lm: LoadedModel) -> None:
    lm = replace(tiny_lm, compile=True)
    decode = replace(STATIC, compile_backend=failing_compiler(fail_after=0))
    try:
        out = run(lm, static_checks.mixed_jobs(), static_checks.LIMITS, decode=decode)
    finally:
        torch._dynamo.reset()
    mode = static_checks.mode_of(out)
    assert mode.label == "static"
    assert "torch.compile failed at start-up" in (mode.note or "")
    for job in static_checks.mixed_jobs():
        expected = reference(tiny_lm, job.prompt, job.params.max_new_tokens)
        assert out.done[job.id].token_ids == expected


def test_the_cache_splits_the_token_budget_between_the_slots(tiny_lm: LoadedModel) -> None:
    per_token = 1
    # 1,000 tokens over 4 slots: 250 a slot, cut to a multiple of 16.
    assert geometry(tiny_lm, 4, 1_000, 0.0, per_token).columns == 240
    # Never past the model's context (1,024 tokens); the fraction applies to GPUs only.
    assert geometry(tiny_lm, 2, 10_000, 0.5, per_token).columns == tiny_lm.max_context
    with pytest.raises(CacheTooSmall, match="GENQ_MAX_BATCH_TOKENS / GENQ_MAX_BATCH_SIZE"):
        geometry(tiny_lm, 32, 32, 0.0, per_token)


def test_the_settings_reach_the_engine() -> None:
    settings = Settings(
        static_decode="on", cuda_graphs=False, gpu_memory_fraction=0.8, prefill_wait_steps=2
    )
    assert decode_config(settings) == DecodeConfig(
        static="on", cuda_graphs=False, gpu_memory_fraction=0.8, prefill_wait_steps=2
    )
