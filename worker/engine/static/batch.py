"""A batch of the static decode path: rows in consecutive slots of the preallocated cache, with the
lifecycle of `batch.Batch` (prefill, extend, advance, filter), which the engine drives alike.

The running batch holds slots 0..n-1; a prefill batch takes the slots right after it, so `extend`
only counts its rows in. A finished row's slot takes a row moved from the end (its cache columns
copied, every layer in one operation), so the rows stay dense and a decode step covers slots
0..bucket-1. A row's span (the columns its next pass reads) is `origin + passes`, as in `Batch`.
"""

from __future__ import annotations

import torch

from worker.engine.compaction import compaction_plan
from worker.engine.model import LoadedModel, vocab
from worker.engine.prefix_cache import KV, PrefixHit
from worker.engine.rows import FAILED, Row, RowBook, Step
from worker.engine.slots import SlotTensors
from worker.engine.static.cache import Geometry, StaticCache
from worker.engine.static.forward import PrefillPart

# Prefill attention reads a multiple of this many columns (SDPA's kernels like aligned masks).
_COLUMN_ALIGN = 16


class SlotState:
    """What the static path keeps across batches, at fixed addresses: the cache, each slot's
    sampling tensors and next input token, the running rows' count (read by the decode step on
    the device) and the logits buffer the decode step writes."""

    def __init__(self, lm: LoadedModel, geometry: Geometry) -> None:
        device = lm.device
        self.cache = StaticCache(lm, geometry)
        self.slots = SlotTensors.empty(geometry.slots, device)
        self.tokens = torch.zeros(geometry.slots, dtype=torch.long, device=device)
        self.live = torch.zeros((), dtype=torch.long, device=device)
        self.logits = torch.zeros((geometry.slots, vocab(lm)), dtype=torch.float32, device=device)

    @property
    def geometry(self) -> Geometry:
        return self.cache.geometry

    def reset(self) -> None:
        """After a failed step: no rows, and a cache with nothing the step may have left."""
        self.slots.rows = 0
        self.live.zero_()
        self.cache.clear()


class StaticBatch(RowBook):
    def __init__(
        self, state: SlotState, rows: list[Row], first: int, part: PrefillPart | None = None
    ) -> None:
        super().__init__(rows, state.tokens.device)
        self.state = state
        self.first = first
        self.part = part  # a prefill batch's, before its pass

    @property
    def span(self) -> int:
        """The most cache columns a row reads at the next pass."""
        return self._widest + self.passes

    @property
    def cached_tokens(self) -> int:
        return self.span

    @classmethod
    def prefill(
        cls,
        state: SlotState,
        lm: LoadedModel,
        rows: list[Row],
        hits: list[PrefixHit | None],
        first: int,
    ) -> StaticBatch:
        """The rows in slots from `first`, their prompts right-padded to the longest rest; a
        row with a cached prefix has it copied into its first columns and feeds the rest."""
        cache = state.cache
        rests = [
            row.prefill_ids[hit.length if hit else 0 :] for row, hit in zip(rows, hits, strict=True)
        ]
        width = max(map(len, rests))
        pad = lm.tokenizer.pad_token_id or 0
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        columns: list[int] = []
        last: list[int] = []
        for i, (row, rest, hit) in enumerate(zip(rows, rests, hits, strict=True)):
            start, padding = len(row.prefill_ids) - len(rest), width - len(rest)
            real = list(range(start, len(row.prefill_ids)))
            tokens += rest + [pad] * padding
            positions += real + [real[-1]] * padding
            columns += real + [cache.scratch] * padding
            slots += [first + i] * width
            last.append(i * width + len(rest) - 1)
            row.cached_prompt_tokens = start
            row.first_pass = 0
            row.first_span = len(row.prefill_ids)
            if hit is not None:
                cache.load_prefix(first + i, hit)
        longest = max(len(row.prefill_ids) for row in rows)
        length = min(-(-longest // _COLUMN_ALIGN) * _COLUMN_ALIGN, cache.geometry.columns)
        device = lm.device
        flat = torch.tensor([tokens, positions, slots, columns], device=device)
        part = PrefillPart(
            tokens=flat[0],
            positions=flat[1],
            slots=flat[2],
            write_columns=flat[3],
            last=torch.tensor(last, device=device),
            first=first,
            rows=len(rows),
            tokens_per_row=width,
            length=length,
        )
        new = SlotTensors.of(
            [row.params for row in rows],
            [row.prompt_ids for row in rows],
            vocab(lm),
            device,
            [row.resumed_ids for row in rows],
        )
        state.slots.put(first, new)
        return cls(state, rows, first, part)

    def prompt_kv(self, i: int) -> KV:
        """Row `i`'s prompt keys and values, after its prefill pass (for the prefix cache)."""
        return self.state.cache.prompt_kv(self.first + i, len(self.rows[i].prefill_ids))

    def extend(self, other: StaticBatch) -> StaticBatch:
        """Count in `other`'s rows, prefilled by the same pass into the slots after these."""
        assert other.first == self.first + len(self.rows), "a prefill batch follows the running one"
        self._take_rows(other)
        self.part = None
        return self

    def advance(self, logits: torch.Tensor, eos_ids: torch.Tensor) -> Step:
        """Pick every row's token from `logits` (rows x vocab, fp32) and make it the row's next
        input; what the host learns of the step comes over in one transfer."""
        state, n = self.state, len(self.rows)
        slots = state.slots
        slots.rows = n
        tokens, step = self._pick(logits, slots, eos_ids)
        slots.tick(tokens)
        state.tokens[:n] = tokens
        self.part = None
        self.passes += 1
        if max(step.codes) >= FAILED:
            # Its scores were NaN or infinite: so may its keys and values be, which would poison
            # whoever takes the slot next (a masked column is still 0 x its value).
            state.cache.zero([i for i, code in enumerate(step.codes) if code & FAILED])
        return step

    def filter(self, dropped: list[int]) -> StaticBatch | None:
        """Drop the rows at indexes `dropped`: each hole below the new size takes a row from
        the end, with its cache columns."""
        if len(dropped) == len(self.rows):
            self.state.slots.rows = 0
            return None
        if not dropped:
            return self
        span = self.span
        moves = self._drop_rows(dropped)
        plan = compaction_plan(len(self.rows), moves, 0, self.state.tokens.device)
        state = self.state
        if plan.dst is not None and plan.src is not None:
            state.cache.move(plan.dst, plan.src, span)
            state.tokens[plan.dst] = state.tokens[plan.src]
        state.slots.compact(plan)
        return self

    def restore_cache_length(self, length: int) -> None:
        """Nothing to undo after a failed pass: a pass rewrites the same columns when it runs
        again."""
