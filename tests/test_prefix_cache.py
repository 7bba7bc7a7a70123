"""The prefix cache's matching, replacement and eviction, on hand-made keys and values."""

from __future__ import annotations

import torch

from worker.engine.prefix_cache import KV, MIN_MATCH_TOKENS, PrefixCache

LAYERS, HEADS, DIM = 2, 2, 4
BYTES_PER_TOKEN = LAYERS * 2 * HEADS * DIM * 4  # fp32 keys and values


def kv_of(tokens: list[int]) -> KV:
    """Keys and values whose every column records the token it belongs to."""
    column = torch.tensor(tokens, dtype=torch.float32).view(1, -1, 1)
    k = column.expand(HEADS, len(tokens), DIM)
    return torch.stack([torch.stack((k + layer, -k - layer)) for layer in range(LAYERS)])


def stored(cache: PrefixCache, tokens: list[int]) -> None:
    assert not cache.covers(tokens)
    cache.store(tokens, kv_of(tokens))


SHARED = list(range(100, 100 + MIN_MATCH_TOKENS + 4))


def test_lookup_gives_the_longest_cached_start_and_its_keys_and_values() -> None:
    cache = PrefixCache(2**20)
    stored(cache, [*SHARED, 1, 2, 3])
    stored(cache, [*SHARED, 1, 2, 9, 9])
    hit = cache.lookup([*SHARED, 1, 2, 9, 5, 6])
    assert hit is not None
    assert hit.length == len(SHARED) + 3
    assert len(hit.kv) == LAYERS
    keys, values = hit.kv[1]
    assert keys.shape == (HEADS, hit.length, DIM)
    assert keys[0, :, 0].tolist() == [t + 1 for t in [*SHARED, 1, 2, 9]]
    assert values[0, :, 0].tolist() == [-t - 1 for t in [*SHARED, 1, 2, 9]]


def test_the_last_prompt_token_is_always_left_to_prefill() -> None:
    cache = PrefixCache(2**20)
    stored(cache, [*SHARED, 1, 2, 3])
    hit = cache.lookup([*SHARED, 1, 2, 3])  # the same prompt again
    assert hit is not None
    assert hit.length == len(SHARED) + 2


def test_short_matches_are_not_worth_a_hit() -> None:
    cache = PrefixCache(2**20)
    stored(cache, [*SHARED, 1])
    assert cache.lookup([*SHARED[: MIN_MATCH_TOKENS - 1], 7, 7]) is None
    assert cache.lookup([*SHARED[:MIN_MATCH_TOKENS], 7, 7]) is not None
    assert cache.lookup([5, *SHARED]) is None


def test_a_longer_prompt_replaces_the_entries_it_starts_with() -> None:
    cache = PrefixCache(2**20)
    stored(cache, [*SHARED, 1])
    stored(cache, [*SHARED, 1, 2, 3])
    assert len(cache) == 1
    assert cache.covers([*SHARED, 1, 2])
    assert cache.nbytes == (len(SHARED) + 3) * BYTES_PER_TOKEN


def test_the_least_recently_used_entries_go_first_when_the_budget_is_full() -> None:
    prompts = [[i, *SHARED] for i in range(3)]
    cache = PrefixCache(2 * len(prompts[0]) * BYTES_PER_TOKEN)
    stored(cache, prompts[0])
    stored(cache, prompts[1])
    assert cache.lookup([*prompts[0], 9]) is not None  # prompt 0 is now the most recent
    stored(cache, prompts[2])
    assert len(cache) == 2
    assert cache.covers(prompts[0])
    assert not cache.covers(prompts[1])
    assert cache.nbytes <= cache.budget_bytes


def test_an_entry_larger_than_the_budget_is_not_kept_and_clear_empties_the_cache() -> None:
    cache = PrefixCache(10 * BYTES_PER_TOKEN)
    cache.store(SHARED, kv_of(SHARED))
    assert len(cache) == 0
    roomy = PrefixCache(2**20)
    stored(roomy, SHARED)
    roomy.clear()
    assert len(roomy) == 0
    assert roomy.nbytes == 0
    assert roomy.lookup([*SHARED, 1]) is None


def test_a_prompt_matches_only_prompts_of_its_own_scope() -> None:
    cache = PrefixCache(2**20)
    cache.store([*SHARED, 1, 2, 3], kv_of([*SHARED, 1, 2, 3]), "alice")
    assert cache.lookup([*SHARED, 1, 2, 3, 4], "bob") is None
    assert not cache.covers([*SHARED, 1], "bob")
    # Bob's own copy does not replace Alice's: each scope keeps its entry.
    cache.store([*SHARED, 1, 2, 3, 4], kv_of([*SHARED, 1, 2, 3, 4]), "bob")
    assert len(cache) == 2
    hit = cache.lookup([*SHARED, 1, 2, 3, 4, 5], "alice")
    assert hit is not None
    assert hit.length == len(SHARED) + 3
