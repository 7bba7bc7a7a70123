"""Keys and values of recent prompts, reused when a later prompt starts the same way.

Chat traffic repeats itself at the front: the chat template and a system prompt open every
request, and a conversation's next turn resends the previous ones. Prefilling those tokens again
costs as much as prefilling new ones, so, like vLLM's automatic prefix caching and SGLang's radix
cache, the engine keeps the KV cache of the prompts it prefilled and starts a new prompt from the
longest cached match. Entries are evicted least recently used first, within a byte budget.

The cache belongs to one engine and its weights: a model swap clears it. Entries are kept per
scope (the API key a request came from; "" for requests that may share with everyone): a prompt
only ever reuses, and so only ever learns the length of, prompts of its own scope.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

# Shorter matches (a BOS token, a role marker) save less prefill than the gather costs.
MIN_MATCH_TOKENS = 16

# A prompt's keys and values, every layer in one tensor: (layers, 2, KV heads, tokens, head dim),
# keys at [:, 0] and values at [:, 1]. One tensor, so that a hit goes into a cache in one copy.
KV = torch.Tensor


@dataclass(frozen=True, slots=True)
class PrefixHit:
    length: int  # prompt tokens whose keys and values are in `kv`
    kv: KV


@dataclass(slots=True)
class _Entry:
    scope: str
    tokens: tuple[int, ...]
    kv: KV
    nbytes: int

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        return self.scope, self.tokens


class PrefixCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], _Entry] = OrderedDict()
        self._bytes = 0

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt_ids: list[int], scope: str = "") -> PrefixHit | None:
        """The longest cached start of `prompt_ids` among prompts of `scope`, leaving at least
        its last token to prefill (that pass yields the first generated token)."""
        best: _Entry | None = None
        best_length = 0
        for entry in self._entries.values():
            if entry.scope != scope:
                continue
            length = _common_prefix(entry.tokens, prompt_ids)
            if length > best_length:
                best, best_length = entry, length
        length = min(best_length, len(prompt_ids) - 1)
        if best is None or length < MIN_MATCH_TOKENS:
            return None
        self._entries.move_to_end(best.key)
        return PrefixHit(length, best.kv[:, :, :, :length])

    def covers(self, prompt_ids: list[int], scope: str = "") -> bool:
        """Whether `prompt_ids` as a whole is already the start of an entry of `scope`."""
        n = len(prompt_ids)
        return any(
            e.scope == scope and _common_prefix(e.tokens, prompt_ids) == n
            for e in self._entries.values()
        )

    def store(self, prompt_ids: list[int], kv: KV, scope: str = "") -> None:
        """Keep a prefilled prompt's keys and values (tensors this cache may hold on to). Callers
        skip prompts it `covers` already, sparing the gather of their keys and values."""
        nbytes = kv.nbytes
        if nbytes > self.budget_bytes:
            return
        tokens = tuple(prompt_ids)
        # Entries of the scope this prompt starts with are redundant: every match they give, it
        # gives.
        redundant = [
            e
            for e in self._entries.values()
            if e.scope == scope and tokens[: len(e.tokens)] == e.tokens
        ]
        for old in redundant:
            self._remove(old)
        entry = _Entry(scope, tokens, kv, nbytes)
        self._entries[entry.key] = entry
        self._bytes += nbytes
        while self._bytes > self.budget_bytes:
            self._remove(next(iter(self._entries.values())))

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _remove(self, entry: _Entry) -> None:
        del self._entries[entry.key]
        self._bytes -= entry.nbytes


def _common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
