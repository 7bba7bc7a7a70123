"""The continuous-batching engine, driven step by step on real models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from common.settings import Settings
from gateway.schemas import ChatMessage, GenerationRequest
from tests.engine_driver import (
    PROMPTS,
    SHARED_START,
    Job,
    greedy,
    reference,
    run,
)
from tests.tiny_model import build_tiny_model
from worker import metrics
from worker.engine import Engine, EngineLimits, fused
from worker.engine.eager.batch import Batch
from worker.engine.eager.kv_cache import SlotBuffer
from worker.engine.generation import build_prompt_ids
from worker.engine.model import LoadedModel
from worker.engine.sampling import SamplingParams
from worker.engine.textstream import TextStream
from worker.loading import load_model
from worker.model_manager import swappable


def hit_tokens(lm: LoadedModel) -> float:
    return float(metrics.PREFIX_CACHE_HITS.labels(*metrics.labels(lm.name))._value.get())


def test_greedy_batch_of_different_lengths_equals_model_generate(tiny_lm: LoadedModel) -> None:
    jobs = [Job(str(i), p, greedy(20 + 5 * i)) for i, p in enumerate(PROMPTS)]
    out = run(tiny_lm, jobs)
    assert max(out.batch_sizes) == len(PROMPTS)
    for job in jobs:
        expected = reference(tiny_lm, job.prompt, job.params.max_new_tokens)
        assert out.done[job.id].token_ids == expected


def test_rows_admitted_mid_flight_equal_model_generate(tiny_lm: LoadedModel) -> None:
    jobs = [Job(str(i), p, greedy(30), at_step=4 * i) for i, p in enumerate(PROMPTS)]
    out = run(tiny_lm, jobs)
    for job in jobs:
        assert out.done[job.id].token_ids == reference(tiny_lm, job.prompt, 30)


def test_admitted_prompts_ride_in_the_running_rows_forward_pass(
    tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[int] = []
    final_norm = tiny_lm.model.model.norm
    norm = final_norm.forward

    def counted(hidden: torch.Tensor) -> object:
        passes[-1] += 1
        return norm(hidden)

    monkeypatch.setattr(final_norm, "forward", counted)
    jobs = [Job(str(i), p, greedy(12), at_step=3 * i) for i, p in enumerate(PROMPTS)]
    out = run(tiny_lm, jobs, before_step=lambda *_: passes.append(0))
    assert set(passes) == {1}  # admissions at steps 3 and 6 joined a running batch
    for job in jobs:
        assert out.done[job.id].token_ids == reference(tiny_lm, job.prompt, 12)


def test_other_architectures_decode_through_their_own_forward(tmp_path: Path) -> None:
    # Phi-3 projects queries, keys and values in one matmul: not the Llama layer the fused pass
    # drives.
    path = build_tiny_model(tmp_path, architecture="phi3")
    lm = load_model(Settings(model=str(path), device="cpu"))
    assert not fused.supports(lm.model)
    jobs = [Job(str(i), p, greedy(20 + 5 * i), at_step=2 * i) for i, p in enumerate(PROMPTS)]
    out = run(lm, jobs)
    assert max(out.batch_sizes) == len(PROMPTS)
    for job in jobs:
        assert out.done[job.id].token_ids == reference(lm, job.prompt, job.params.max_new_tokens)


@pytest.mark.parametrize(
    ("architecture", "config"),
    [
        ("mistral", {"sliding_window": 48}),  # through the fused pass
        # Through the models' own forward passes.
        ("phi3", {"sliding_window": 48}),
        ("gemma3_text", {"sliding_window": 48}),
    ],
)
def test_a_sliding_window_model_serves_rows_up_to_its_window(
    tmp_path: Path, architecture: str, config: dict[str, object]
) -> None:
    # Mistral-7B-v0.1's layers attend to the last 4,096 tokens only; within the window that is
    # full attention, which the engine's caches give exactly.
    path = build_tiny_model(tmp_path, architecture=architecture, config=config)
    lm = load_model(Settings(model=str(path), device="cpu"))
    assert lm.max_context == lm.sliding_window == 48
    lengths = [len(build_prompt_ids(lm, GenerationRequest(prompt=p))) for p in PROMPTS]
    # Each row fills the window to its last token.
    jobs = [
        Job(str(i), p, greedy(48 - n), at_step=i)
        for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True))
    ]
    jobs.append(Job("past-window", PROMPTS[0], greedy(48)))
    out = run(lm, jobs)
    assert "(48 tokens: its sliding attention window)" in str(out.errors["past-window"])
    for job in jobs[:-1]:
        expected = reference(lm, job.prompt, job.params.max_new_tokens)
        assert out.done[job.id].token_ids == expected, job.id


def test_batch_surgery_keeps_every_row_as_it_would_be_alone(tiny_lm: LoadedModel) -> None:
    # Rows finish at different steps (their slots are refilled from the end), more rows arrive
    # than the batch has spare slots, a prompt longer than the running cache arrives (the cache
    # grows on the left), and a row outlives the spare columns. Greedy rows must equal
    # model.generate; seeded sampled rows (whose draws move with any change in the
    # distribution, where a random tiny model's argmax often would not) must equal a run alone.
    def sampled(n: int, seed: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=n, temperature=1.0, seed=seed)

    words = ["fox", "capital", "model", "token", "stream", "batch", "Paris", "quick"]
    jobs = [Job("long-lived", PROMPTS[0], greedy(SlotBuffer.COLUMN_SLACK + 20))]
    jobs += [Job(f"early{i}", PROMPTS[i % 3], sampled(3 + 4 * i, i)) for i in range(4)]
    jobs += [
        Job(
            f"wave{i}",
            " ".join(words[: 1 + i % len(words)]) * (1 + i % 3),
            greedy(10 + 3 * i) if i % 2 else sampled(10 + 3 * i, i),
            at_step=6,
        )
        for i in range(SlotBuffer.ROW_SLACK + 5)
    ]
    # Not periodic: attention over a cut-off repeat of the same sentence would look alike.
    longest = " ".join(f"{word} {i}" for i, word in enumerate(words * 6))
    jobs.append(Job("longest-prompt", longest, sampled(20, 7), at_step=40))
    out = run(tiny_lm, jobs)
    assert max(out.batch_sizes) > 5 + SlotBuffer.ROW_SLACK
    assert not out.errors
    for job in jobs:
        if job.params.greedy:
            expected = reference(tiny_lm, job.prompt, job.params.max_new_tokens)
        else:
            alone = Job(job.id, job.prompt, job.params)
            expected = run(tiny_lm, [alone]).done[job.id].token_ids
        assert out.done[job.id].token_ids == expected, job.id


def test_prompts_that_start_alike_reuse_the_prefix_and_decode_as_alone(
    tiny_lm: LoadedModel,
) -> None:
    sampled = SamplingParams(max_new_tokens=20, temperature=1.0, seed=5)
    jobs = [
        Job("first", SHARED_START + "What is the capital of France?", greedy(12)),
        # Admitted together: a prefix hit, a longer one, a miss, and a sampled hit.
        Job("hit", SHARED_START + "Tell me about the quick brown fox.", greedy(15), at_step=3),
        Job("longer", SHARED_START + "What is the capital of Spain?", greedy(15), at_step=3),
        Job("miss", PROMPTS[2], greedy(15), at_step=3),
        Job("sampled", SHARED_START + "Once upon a time", sampled, at_step=3),
    ]
    before = hit_tokens(tiny_lm)
    out = run(tiny_lm, jobs)
    shared_tokens = len(build_prompt_ids(tiny_lm, GenerationRequest(prompt=SHARED_START))) - 1
    assert hit_tokens(tiny_lm) - before >= 3 * shared_tokens
    off = EngineLimits(prefix_cache_bytes=0)
    for job in jobs:
        if job.params.greedy:
            expected = reference(tiny_lm, job.prompt, job.params.max_new_tokens)
        else:
            alone = run(tiny_lm, [Job(job.id, job.prompt, job.params)], limits=off)
            expected = alone.done[job.id].token_ids
        assert out.done[job.id].token_ids == expected, job.id


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(tiny_lm: LoadedModel) -> None:
    sampled = SamplingParams(max_new_tokens=25, temperature=0.9, top_p=0.95, top_k=40, seed=42)
    alone = run(tiny_lm, [Job("s", "Once upon", sampled)])
    crowd = [Job(f"g{i}", p, greedy(30), at_step=i) for i, p in enumerate(PROMPTS)]
    together = run(tiny_lm, [*crowd, Job("s", "Once upon", sampled, at_step=2)])
    assert together.done["s"].token_ids == alone.done["s"].token_ids
    other_seed = SamplingParams(max_new_tokens=25, temperature=0.9, seed=43)
    assert run(tiny_lm, [Job("s", "Once upon", other_seed)]).done["s"].text != alone.text["s"]


def test_seeded_rows_sample_the_same_alone_and_in_any_mix(tiny_lm: LoadedModel) -> None:
    # Every pass samples all rows at once; what it computes depends on the mix (a top-p row
    # without top-k has its whole vocabulary ranked, top-k rows the top of theirs, plain rows
    # neither). A row's tokens must not.
    def sampled(seed: int, **kwargs: float) -> SamplingParams:
        return SamplingParams(max_new_tokens=24, seed=seed, **kwargs)  # type: ignore[arg-type]

    mix = [
        greedy(24),
        sampled(1, temperature=0.7),
        sampled(2, temperature=1.0, top_k=5),
        sampled(3, temperature=0.9, top_p=0.8),
        sampled(4, temperature=1.2, top_k=20, top_p=0.9),
        sampled(5, temperature=1.5, top_p=0.5),
        sampled(6, temperature=1.0),
    ]
    jobs = [Job(f"r{i}", PROMPTS[i % 3], p, at_step=i % 3) for i, p in enumerate(mix)]
    alone = {j.id: run(tiny_lm, [Job(j.id, j.prompt, j.params)]).done[j.id].token_ids for j in jobs}
    runs = [
        run(tiny_lm, jobs),
        run(tiny_lm, [Job(j.id, j.prompt, j.params, at_step=k) for k, j in enumerate(jobs[::-1])]),
        run(tiny_lm, jobs[::2]),
        run(tiny_lm, jobs[1::2]),
    ]
    for out in runs:
        for job_id, generation in out.done.items():
            assert generation.token_ids == alone[job_id], job_id
    assert alone["r0"] == reference(tiny_lm, PROMPTS[0], 24)
    # The sampled rows did sample: the same prompt and seeds, greedy, give other tokens.
    assert alone["r3"] != reference(tiny_lm, PROMPTS[0], 24)
    assert alone["r6"] != run(tiny_lm, [Job("x", PROMPTS[0], sampled(7))]).done["x"].token_ids


def test_streamed_text_equals_final_text_multibyte_included(tiny_lm: LoadedModel) -> None:
    jobs = [
        Job(str(seed), "emoji 🎉 and 日本語", SamplingParams(max_new_tokens=40, seed=seed))
        for seed in range(6)
    ]
    out = run(tiny_lm, jobs)
    for job in jobs:
        assert out.text[job.id] == out.done[job.id].text
    # The random model does produce multi-byte characters, so the check above covers them.
    assert any(any(ord(c) > 127 for c in g.text) for g in out.done.values())


def test_stop_string_ends_the_row_before_it(tiny_lm: LoadedModel) -> None:
    whole = run(tiny_lm, [Job("a", PROMPTS[1], greedy(30))]).done["a"]
    full = whole.text
    stop = full[10:13]
    params = SamplingParams(max_new_tokens=30, temperature=0.0, stop=(stop,))
    out = run(tiny_lm, [Job("a", PROMPTS[1], params), Job("b", PROMPTS[2], greedy(30))])
    assert out.done["a"].finish_reason == "stop"
    assert out.done["a"].text == full[: full.index(stop)]
    assert out.text["a"] == out.done["a"].text
    # Its tokens end with the one that completed the stop string: none past it are counted,
    # though the text side found the stop string after the engine had moved on.
    prompt_ids = build_prompt_ids(tiny_lm, GenerationRequest(prompt=PROMPTS[1]))
    stream = TextStream(tiny_lm.tokenizer, prompt_ids, [stop])
    upto = 0
    while not stream.stopped:
        stream.push(whole.token_ids[upto])
        upto += 1
    assert out.done["a"].token_ids == whole.token_ids[:upto]
    # The step that gave that token kept the row; the engine dropped it at the next step.
    assert out.batch_sizes[upto - 1 : upto + 1] == [2, 1]


def test_cancelling_a_row_leaves_the_others_unchanged(tiny_lm: LoadedModel) -> None:
    jobs = [Job(str(i), p, greedy(30)) for i, p in enumerate(PROMPTS)]
    full = run(tiny_lm, jobs)
    cut = run(tiny_lm, jobs, cancel={6: "1"})
    assert cut.done["1"].finish_reason == "cancelled"
    assert 0 < cut.done["1"].completion_tokens < 30
    assert full.done["1"].token_ids[: cut.done["1"].completion_tokens] == cut.done["1"].token_ids
    for other in ("0", "2"):
        assert cut.done[other].token_ids == full.done[other].token_ids


def test_cancelling_a_waiting_request_never_runs_it(tiny_lm: LoadedModel) -> None:
    jobs = [Job("a", PROMPTS[0], greedy(10)), Job("b", PROMPTS[1], greedy(10))]
    out = run(tiny_lm, jobs, limits=EngineLimits(max_batch_size=1), cancel={1: "b"})
    assert out.done["b"].finish_reason == "cancelled"
    assert out.done["b"].token_ids == []


def test_batch_size_and_token_budget_bound_the_batch(tiny_lm: LoadedModel) -> None:
    jobs = [Job(str(i), PROMPTS[i % 3], greedy(12)) for i in range(5)]
    out = run(tiny_lm, jobs, limits=EngineLimits(max_batch_size=2))
    assert max(out.batch_sizes) == 2
    assert len(out.done) == 5
    reserved = [len(build_prompt_ids(tiny_lm, GenerationRequest(prompt=p))) + 12 for p in PROMPTS]
    budget = run(tiny_lm, jobs, limits=EngineLimits(max_batch_tokens=2 * max(reserved)))
    assert max(budget.batch_sizes) < 5
    assert len(budget.done) == 5


def test_memory_limit_makes_rows_wait_instead_of_failing(tiny_lm: LoadedModel) -> None:
    jobs = [Job(str(i), PROMPTS[i % 3], greedy(8)) for i in range(3)]
    out = run(tiny_lm, jobs, limits=EngineLimits(memory_limit_bytes=1))
    assert max(out.batch_sizes) == 1  # an empty engine still takes one row at a time
    assert len(out.done) == 3


def test_cached_prompts_give_their_memory_up_to_rows(tiny_lm: LoadedModel) -> None:
    jobs = [
        Job("a", SHARED_START + "first", greedy(8)),
        Job("b", SHARED_START + "second", greedy(8), at_step=2),
    ]
    before = hit_tokens(tiny_lm)
    roomy = run(tiny_lm, jobs)
    assert hit_tokens(tiny_lm) > before
    # Under the limit, "b" waits for "a"; the cache is cleared to make room, so "b" misses.
    before = hit_tokens(tiny_lm)
    tight = run(tiny_lm, jobs, limits=EngineLimits(memory_limit_bytes=1))
    assert hit_tokens(tiny_lm) == before
    assert max(tight.batch_sizes) == 1
    for job in jobs:
        assert tight.done[job.id].token_ids == roomy.done[job.id].token_ids


def test_out_of_memory_while_caching_a_prompt_costs_only_the_cache(
    tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(self: Batch, i: int) -> object:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Batch, "prompt_kv", no_memory)
    jobs = [Job(str(i), SHARED_START + p, greedy(10), at_step=i) for i, p in enumerate(PROMPTS)]
    out = run(tiny_lm, jobs)
    assert not out.errors
    for job in jobs:
        assert out.done[job.id].token_ids == reference(tiny_lm, job.prompt, 10)


def test_requests_that_cannot_fit_fail_with_a_reason(tiny_lm: LoadedModel) -> None:
    jobs = [
        Job("long", "word " * 1100, greedy(10)),
        Job("budget", PROMPTS[0], greedy(200)),
        Job("fine", PROMPTS[0], greedy(5)),
    ]
    out = run(tiny_lm, jobs, limits=EngineLimits(max_batch_tokens=100))
    assert "context window" in str(out.errors["long"])
    assert "GENQ_MAX_BATCH_TOKENS" in str(out.errors["budget"])
    assert out.done["fine"].completion_tokens == 5


def out_of_memory_at(
    step: int, lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> Callable[[int, Engine], object]:
    """A CUDA out-of-memory error cannot happen on this CPU machine: make the forward pass of
    `step` raise it, past every layer (their caches have grown), and check the engine's recovery
    for real."""
    final_norm = lm.model.model.norm

    def failing(*args: object, **kwargs: object) -> object:
        monkeypatch.undo()
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    def arm(at: int, _: Engine) -> None:
        if at == step:
            monkeypatch.setattr(final_norm, "forward", failing)

    return arm


def test_out_of_memory_fails_only_the_newest_row(
    tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [Job(str(i), p, greedy(20)) for i, p in enumerate(PROMPTS)]
    expected = run(tiny_lm, jobs)
    out = run(tiny_lm, jobs, before_step=out_of_memory_at(5, tiny_lm, monkeypatch))
    assert out.errors["2"].code == "out_of_memory"
    for survivor in ("0", "1"):
        assert out.done[survivor].token_ids == expected.done[survivor].token_ids


def test_out_of_memory_in_a_step_that_admits_rows_makes_them_wait(
    tiny_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = [Job(str(i), p, greedy(20)) for i, p in enumerate(PROMPTS[:2])]
    jobs.append(Job("late", PROMPTS[2], greedy(20), at_step=5))
    out = run(tiny_lm, jobs, before_step=out_of_memory_at(5, tiny_lm, monkeypatch))
    assert not out.errors
    assert max(out.batch_sizes) == 2  # "late" waited for the running rows to finish
    for job in jobs:
        assert out.done[job.id].token_ids == reference(tiny_lm, job.prompt, 20)


def test_a_swapped_in_model_takes_over_between_steps_keeping_rows_in_flight(
    tiny_lm: LoadedModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    twin = load_model(Settings(model=str(tiny_model_dir), device="cpu"))
    # Same shapes and vocabulary, other weights: a new version of the model.
    other = load_model(Settings(model=str(build_tiny_model(tmp_path, seed=99)), device="cpu"))
    assert swappable(tiny_lm, twin)
    assert swappable(tiny_lm, other)
    jobs = [Job(str(i), p, greedy(20)) for i, p in enumerate(PROMPTS)]
    expected = run(tiny_lm, jobs)

    def swap_to(lm: LoadedModel) -> Callable[[int, Engine], object]:
        def before_step(step: int, engine: Engine) -> None:
            if step == 5:
                engine.swap_model(lm)

        return before_step

    # Reloading the same weights mid-flight changes no token: the rows' caches carry over.
    same = run(tiny_lm, jobs, before_step=swap_to(twin))
    for job in jobs:
        assert same.done[job.id].token_ids == expected.done[job.id].token_ids
    # Other weights: tokens before the swap are the old model's, later ones differ.
    swapped = run(tiny_lm, jobs, before_step=swap_to(other))
    assert not swapped.errors
    for job in jobs:
        assert swapped.done[job.id].token_ids[:5] == expected.done[job.id].token_ids[:5]
    assert any(swapped.done[j.id].token_ids != expected.done[j.id].token_ids for j in jobs)


def test_chat_messages_use_the_chat_template(tiny_lm: LoadedModel) -> None:
    request = GenerationRequest(messages=[ChatMessage(role="user", content="Hi")])
    ids = build_prompt_ids(tiny_lm, request)
    assert (
        tiny_lm.tokenizer.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.fixture(scope="module")
def default_lm() -> LoadedModel:
    return load_model(Settings(device="cpu"))


def test_default_model_greedy_batch_equals_model_generate(default_lm: LoadedModel) -> None:
    questions = [
        "What is the capital of France?",
        "Name three primary colours.",
        "Write one sentence about the sea, please, in a calm tone.",
    ]
    jobs = [Job(str(i), q, greedy(24), at_step=3 * i, chat=True) for i, q in enumerate(questions)]
    out = run(default_lm, jobs)
    for job in jobs:
        assert out.done[job.id].token_ids == reference(default_lm, job.prompt, 24, chat=True)
        assert out.text[job.id] == out.done[job.id].text
    assert "Paris" in out.done["0"].text
