"""Admission counts the cache the batch really holds: rows are left-padded to the widest, so a
long row among short ones costs its width in every row."""

from __future__ import annotations

import random

import pytest
import torch

from gateway.schemas import GenerationRequest
from tests.engine_driver import PROMPTS, SHARED_START, Job, greedy, reference, run
from worker import metrics
from worker.engine import EngineLimits
from worker.engine.eager import path as eager_path
from worker.engine.eager.batch import Batch, forward_all
from worker.engine.eager.kv_cache import SlotLayer
from worker.engine.generation import build_prompt_ids
from worker.engine.memory import padded_peak
from worker.engine.model import LoadedModel

# Not periodic: a long prompt of one repeated word would make a random model repeat itself.
LONG_PROMPT = " ".join(f"{word} {i}" for i, word in enumerate(PROMPTS[2].split() * 3))


def stepped(rows: list[tuple[int, int]]) -> int:
    """`padded_peak` the slow way: every step, the rows still there times the widest."""
    peak = 0
    for k in range(max((steps for _, steps in rows), default=0)):
        spans = [span for span, steps in rows if steps > k]
        peak = max(peak, len(spans) * (max(spans) + k))
    return peak


def test_padded_peak_is_the_widest_cache_over_the_steps_to_come() -> None:
    rng = random.Random(7)
    assert padded_peak([]) == 0
    assert padded_peak([(300, 10), (5, 40)]) == max(2 * 309, 44)
    for _ in range(500):
        rows = [(rng.randint(1, 60), rng.randint(1, 30)) for _ in range(rng.randint(1, 12))]
        assert padded_peak(rows) == stepped(rows), rows


def prompt_tokens(lm: LoadedModel, prompt: str) -> int:
    return len(build_prompt_ids(lm, GenerationRequest(prompt=prompt)))


@pytest.fixture
def cache_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The KV-cache tokens of every forward pass the engine runs, read off the caches."""
    sizes: list[int] = []

    def measured(lm: LoadedModel, batches: list[Batch]) -> object:
        logits = forward_all(lm, batches)
        size = 0
        for batch in batches:
            layer = batch.cache.layers[0]
            assert isinstance(layer, SlotLayer)
            keys = layer.keys  # the live window: rows x heads x columns x dim
            assert isinstance(keys, torch.Tensor)
            size += keys.shape[0] * keys.shape[2]
        sizes.append(size)
        return logits

    monkeypatch.setattr(eager_path, "forward_all", measured)
    return sizes


def test_a_long_row_waits_until_the_padded_cache_has_room(
    tiny_lm: LoadedModel, cache_sizes: list[int]
) -> None:
    long_tokens = prompt_tokens(tiny_lm, LONG_PROMPT)
    shorts = [Job(f"short{i}", PROMPTS[i % 2], greedy(40)) for i in range(4)]
    long = Job("long", LONG_PROMPT, greedy(10), at_step=1)
    later = [Job(f"later{i}", PROMPTS[i], greedy(10), at_step=2) for i in range(2)]
    jobs = [*shorts, long, *later]
    # Prompt + max_new_tokens of every row fit the budget: counting that way would run the
    # long row beside the short ones, each of them padded to its width.
    reserved = sum(prompt_tokens(tiny_lm, j.prompt) + j.params.max_new_tokens for j in jobs)
    budget = reserved + 10
    assert budget < 2 * long_tokens
    out = run(tiny_lm, jobs, limits=EngineLimits(max_batch_tokens=budget))
    assert max(cache_sizes) <= budget
    assert max(out.batch_sizes) >= 4  # the short rows still ran together
    for job in jobs:
        assert out.done[job.id].token_ids == reference(
            tiny_lm, job.prompt, job.params.max_new_tokens
        )


@pytest.mark.parametrize("budget_times", [1, 2, 3, 6])
def test_padding_between_a_cached_prefix_and_its_rest_is_counted(
    tiny_lm: LoadedModel, cache_sizes: list[int], budget_times: int
) -> None:
    # `hit` takes its start from the prefix cache: prefilled beside `miss`, its cache reads
    # [prefix, padding as long as miss's prompt, rest], far wider than its own prompt, and it
    # keeps that width after `miss` has ended.
    jobs = [
        Job("warm", SHARED_START + "first", greedy(2)),
        Job("hit", SHARED_START + "What?", greedy(30), at_step=4),
        Job("miss", LONG_PROMPT, greedy(3), at_step=4),
    ]
    alone = max(prompt_tokens(tiny_lm, j.prompt) + j.params.max_new_tokens for j in jobs)
    budget = budget_times * alone
    before = metrics.PREFIX_CACHE_HITS.labels(*metrics.labels(tiny_lm.name))._value.get()
    out = run(tiny_lm, jobs, limits=EngineLimits(max_batch_tokens=budget))
    assert max(cache_sizes) <= budget
    if budget_times == 6:  # room for both: they ran together, the prefix was reused
        assert max(out.batch_sizes) == 2
        assert metrics.PREFIX_CACHE_HITS.labels(*metrics.labels(tiny_lm.name))._value.get() > before
    for job in jobs:
        assert out.done[job.id].token_ids == reference(
            tiny_lm, job.prompt, job.params.max_new_tokens
        )
