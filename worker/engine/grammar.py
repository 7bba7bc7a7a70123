"""Structured output: a row whose request carries a grammar (a JSON schema, a regex, a choice or a
Lark grammar, which the gateway turned into llguidance's grammar and checked) samples only the
tokens its grammar allows, and ends where the grammar does.

llguidance computes each row's allowed tokens as a bitmask (one bit a token id), for every
constrained row of a step at once on its own threads; the mask turns the others' logits to -inf
inside the batch's sampling pass, before the processors, so greedy and seeded rows alike pick
from what the grammar allows, with the same counter-based draws. A row's next mask depends only
on its tokens so far, so it is computed as soon as the step's tokens are known, on a thread of
its own, while the engine goes on to the next forward pass; the rows admitted meanwhile have
theirs computed when the mask is needed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from common.contract import ErrorCode
from worker.engine.generation import GenerationError

if TYPE_CHECKING:
    from worker.engine.rows import Row

# Compiled grammars kept per model, by their text: clients send the same few schemas again.
_CACHED_GRAMMARS = 64
# Computing masks on several threads pays for rows with large grammars only past a few rows.
_MASK_THREADS = 2


class InvalidGrammar(GenerationError):
    """llguidance refused the request's grammar (the gateway checks what it can first)."""

    code = ErrorCode.invalid_prompt


class Grammars:
    """One model's grammar side: its tokenizer as llguidance sees it (built on first use, about a
    second) and its compiled grammars, each row getting a copy of its grammar's matcher."""

    def __init__(self, tokenizer: Any, vocab: int) -> None:
        self._tokenizer = tokenizer
        self.vocab = vocab
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher of `grammar`, or InvalidGrammar."""
        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is None:
                compiled = llguidance.LLMatcher(self._ll(), grammar, log_level=0)
                if compiled.is_error():
                    raise InvalidGrammar(f"the structured output's grammar: {compiled.get_error()}")
                self._compiled[grammar] = compiled
                if len(self._compiled) > _CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(grammar)
            return compiled.deep_copy()

    def _ll(self) -> llguidance.LLTokenizer:
        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self._tokenizer, n_vocab=self.vocab)
        return self._ll_tokenizer


class Masks:
    """The next step's masks of a batch's constrained rows, computed ahead on a thread while the
    forward pass runs (`ahead`), and taken when the step samples (`take`)."""

    _executor: llguidance.LLExecutor | None = None
    _threads: ThreadPoolExecutor | None = None

    def __init__(self) -> None:
        self._pending: Future[tuple[list[Row], torch.Tensor]] | None = None

    @classmethod
    def _pools(cls) -> tuple[llguidance.LLExecutor, ThreadPoolExecutor]:
        if cls._executor is None or cls._threads is None:
            cls._executor = llguidance.LLExecutor(num_threads=_MASK_THREADS)
            cls._threads = ThreadPoolExecutor(1, thread_name_prefix="genq-grammar")
        return cls._executor, cls._threads

    def ahead(self, rows: Sequence[Row], vocab: int) -> None:
        """Start computing the masks of `rows` (constrained, still running) for their next token."""
        if rows:
            _, threads = self._pools()
            self._pending = threads.submit(self._fill, list(rows), vocab)

    def take(self, rows: Sequence[Row], logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, allowed): the slots of `rows` (in slot order) that follow a grammar, and the
        tokens each may pick (slots x the width of `logits`, bool, on its device)."""
        vocab, device = logits.shape[1], logits.device
        slots = [i for i, row in enumerate(rows) if row.matcher is not None]
        constrained = [rows[i] for i in slots]
        ready: dict[int, torch.Tensor] = {}
        if self._pending is not None:
            computed, bitmask = self._pending.result()
            self._pending = None
            at = {id(row): k for k, row in enumerate(computed)}
            ready = {id(row): bitmask[at[id(row)]] for row in constrained if id(row) in at}
        missing = [row for row in constrained if id(row) not in ready]
        if missing:
            _, bitmask = self._fill(missing, vocab)
            ready.update({id(row): bitmask[k] for k, row in enumerate(missing)})
        bitmask = torch.stack([ready[id(row)] for row in constrained])
        return torch.tensor(slots, device=device), allowed(bitmask.to(device), vocab)

    def _fill(self, rows: list[Row], vocab: int) -> tuple[list[Row], torch.Tensor]:
        executor, _ = self._pools()
        bitmask = llguidance.torch.allocate_token_bitmask(len(rows), vocab)
        pairs = [(row.matcher, k) for k, row in enumerate(rows) if row.matcher is not None]
        llguidance.torch.fill_next_token_bitmask_par(executor, pairs, bitmask)
        return rows, bitmask


def allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bitmasks (rows x words, int32: bit b of word w is token 32 w + b) as booleans over the
    vocabulary (rows x vocab)."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    unpacked = (bitmask.unsqueeze(-1) >> bits) & 1
    return unpacked.flatten(1)[:, :vocab].bool()
