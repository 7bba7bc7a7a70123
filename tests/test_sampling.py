"""One sampling pass for a whole batch: greedy and sampled rows together, each row's draw a
function of its own scores, parameters, seed and position alone."""

from __future__ import annotations

import random
from collections import Counter
from typing import cast

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tests.sampling_harness import sample
from worker.engine.sampling import SamplingParams, stream_key, uniform

VOCAB = 48
MASK64 = 2**64 - 1


def splitmix64(state: int) -> int:
    """The reference: one output of SplitMix64 (Steele, Lea and Flood), whose state is `state`
    after its increment."""
    z = state & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_a_rows_numbers_are_splitmix64_outputs_of_its_mixed_seed() -> None:
    rng = random.Random(3)
    seeds = [0, 1, 2, 2**63 - 1, *(rng.randrange(2**63) for _ in range(20))]
    positions = [0, 1, 2, 1000, 2**20, *(rng.randrange(2**31) for _ in range(20))]
    golden = 0x9E3779B97F4A7C15
    keys = torch.tensor([stream_key(seed) for seed in seeds])
    for position in positions:
        got = uniform(keys, torch.full_like(keys, position)).tolist()
        for seed, value in zip(seeds, got, strict=True):
            key = splitmix64(seed + golden)
            expected = (splitmix64(key + (position + 1) * golden) >> 40) / 2**24
            assert value == expected, (seed, position)
            assert 0.0 <= value < 1.0


def test_nearby_seeds_and_positions_give_unrelated_numbers() -> None:
    keys = torch.tensor([stream_key(seed) for seed in range(64)])
    by_seed = uniform(keys, torch.zeros_like(keys))
    by_position = uniform(keys[:1].expand(4096), torch.arange(4096))
    assert len(set(by_seed.tolist())) == 64
    # Uniform over [0, 1): each tenth holds about a tenth of 4096 draws.
    tenths = Counter(int(10 * u) for u in by_position.tolist())
    assert all(abs(count - 409.6) < 80 for count in tenths.values())
    assert len(tenths) == 10


def reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """What transformers' warpers leave of one row's distribution (the old per-row sampler's)."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature)])
    if params.top_k:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    no_ids = cast(torch.LongTensor, torch.empty((1, 0), dtype=torch.long))
    scores = warpers(no_ids, cast(torch.FloatTensor, logits.unsqueeze(0)))
    return torch.softmax(scores, dim=-1).squeeze(0)


KINDS = [
    SamplingParams(max_new_tokens=1, temperature=1.0, seed=11),
    SamplingParams(max_new_tokens=1, temperature=0.7, top_k=5, seed=12),
    SamplingParams(max_new_tokens=1, temperature=1.3, top_p=0.6, seed=13),
    SamplingParams(max_new_tokens=1, temperature=0.9, top_k=12, top_p=0.8, seed=14),
    SamplingParams(max_new_tokens=1, temperature=2.0, top_k=1, seed=15),
    SamplingParams(max_new_tokens=1, temperature=0.5, top_p=0.05, seed=16),
]


def test_top_k_and_top_p_never_pick_outside_the_allowed_set_over_many_draws() -> None:
    # Every kind in one batch, each drawn at 3,000 positions: the rows of the batch are
    # (kind, position) pairs, so greedy-free mixes of top-k, top-p and both share every pass.
    torch.manual_seed(0)
    logits = torch.randn(len(KINDS), VOCAB) * 2
    draws = 3000
    params = [kind for kind in KINDS for _ in range(draws)]
    positions = [position for _ in KINDS for position in range(draws)]
    picks = sample(logits.repeat_interleave(draws, dim=0), params, positions)
    for k, kind in enumerate(KINDS):
        expected = reference_probs(logits[k], kind)
        allowed = set(expected.nonzero().squeeze(1).tolist())
        counts = Counter(picks[k * draws : (k + 1) * draws])
        assert set(counts) <= allowed, kind
        for token in range(VOCAB):
            # Within about four standard deviations of the allowed distribution.
            assert abs(counts[token] / draws - float(expected[token])) < 0.04, (kind, token)
    assert len(set(picks[draws * 4 : draws * 5])) == 1  # top-k 1 is greedy


def test_a_rows_draw_is_the_same_whatever_else_shares_its_pass() -> None:
    torch.manual_seed(1)
    logits = torch.randn(len(KINDS) + 1, VOCAB)
    greedy = SamplingParams(max_new_tokens=1, temperature=0.0)
    params = [*KINDS, greedy]
    for position in (0, 7, 123):
        together = sample(logits, params, position)
        alone = [sample(logits[i : i + 1], [p], position)[0] for i, p in enumerate(params)]
        reordered = sample(logits.flip(0), params[::-1], position)[::-1]
        assert together == alone == reordered
        assert together[-1] == int(logits[-1].argmax())


@pytest.mark.parametrize("temperature", [0.0, 1e-6])
def test_greedy_rows_take_the_best_score(temperature: float) -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, VOCAB)
    params = [
        SamplingParams(max_new_tokens=1, temperature=temperature, top_k=3, seed=s) for s in range(3)
    ]
    assert sample(logits, params) == logits.argmax(dim=-1).tolist()
