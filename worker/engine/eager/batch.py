"""A batch of sequences decoded together, with TGI's lifecycle: `prefill` a batch from new
requests, `forward_all` (one forward pass over the running batch and the prefill batch), `extend`
the running batch with the prefilled rows, `advance` (a token for every row: one sampling pass,
one device-to-host transfer) and `filter` the rows that ended out.

Rows are left-padded: every row's next token sits in the last column, so one forward pass feeds
them all. Padding is masked out by the attention mask; positions count a row's real tokens, so
a row sees the positions it would have alone.

A step costs O(1) Python in the number of rows, apart from the rows that come and go: the next
inputs are the sampled tokens themselves, the mask and the per-row tensors live in buffers with
spare room, and what the host needs of each row (its cache span, tokens left) follows from the
batch's pass count.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from worker.engine import fused
from worker.engine.compaction import Compaction, compaction_plan
from worker.engine.eager.kv_cache import (
    SlotBuffer,
    layers,
    live,
    load_prefixes,
    new_cache,
)
from worker.engine.model import LoadedModel, vocab
from worker.engine.prefix_cache import KV, PrefixHit
from worker.engine.rows import Row, RowBook, Step
from worker.engine.slots import SlotTensors


class Batch(RowBook):
    """`input_ids` (B, T) are the tokens to feed next: whole prompts before the first pass, one
    token per row after. The mask buffer (B x 1 x columns x 1, bool) covers the cache and those
    inputs; `slots` holds each row's sampling parameters and counters."""

    def __init__(
        self,
        rows: list[Row],
        input_ids: torch.Tensor,
        mask: SlotBuffer,
        cache: DynamicCache,
        slots: SlotTensors,
        attention: fused.Attention | None = None,
    ) -> None:
        super().__init__(rows, mask.device)
        self.input_ids = input_ids
        self.mask = mask
        self.cache = cache
        self.slots = slots
        self._attention = attention  # a prefill batch's, before its pass

    @property
    def cached_tokens(self) -> int:
        return self.mask.width - self.input_ids.shape[1]

    def extents(self) -> list[tuple[int, int]]:
        """Each row's (span, steps) for `padded_peak`: the cache columns it spans at the next
        forward pass, from its first real one, and the forward passes it has left."""
        p = self.passes
        return [(row.origin + p, row.budget - (p - row.first_pass)) for row in self.rows]

    @classmethod
    def prefill(
        cls, lm: LoadedModel, rows: list[Row], prefixes: list[PrefixHit | None] | None = None
    ) -> Batch:
        """A batch that feeds the rows' prompts. A row with a cached prefix feeds only the rest:
        its cache holds the prefix, and its mask reads [pad, prefix, pad, rest]."""
        hits = prefixes or [None] * len(rows)
        cached = [hit.length if hit else 0 for hit in hits]
        prefix_width = max(cached)
        rests = [row.prefill_ids[n:] for row, n in zip(rows, cached, strict=True)]
        longest = max(map(len, rests))
        pad = lm.tokenizer.pad_token_id or 0
        ids = [[pad] * (longest - len(rest)) + rest for rest in rests]
        mask = torch.zeros((len(rows), prefix_width + longest), dtype=torch.bool)
        for i, (row, rest, n) in enumerate(zip(rows, rests, cached, strict=True)):
            mask[i, prefix_width - n : prefix_width] = True
            mask[i, prefix_width + longest - len(rest) :] = True
            row.cached_prompt_tokens = n
            row.first_pass = 0
            first_column = prefix_width - n if n else prefix_width + longest - len(rest)
            row.first_span = prefix_width + longest - first_column
        cache = new_cache(lm)
        if prefix_width:
            load_prefixes(cache, hits, prefix_width)
        device = lm.device
        mask = mask.to(device)
        buffer = SlotBuffer()
        buffer.write([mask[:, None, :, None]])
        slots = SlotTensors.of(
            [row.params for row in rows],
            [row.prompt_ids for row in rows],
            vocab(lm),
            device,
            [row.resumed_ids for row in rows],
        )
        input_ids = torch.tensor(ids, device=device)
        return cls(rows, input_ids, buffer, cache, slots, fused.prefill_attention(mask, longest))

    @staticmethod
    def prefill_extents(rows: list[Row], prefixes: list[PrefixHit | None]) -> list[tuple[int, int]]:
        """`extents` of the rows once `prefill(rows, prefixes)` has run its forward pass: a row
        spans its prompt, or, with a cached prefix, the prefix and the longest rest."""
        cached = [hit.length if hit else 0 for hit in prefixes]
        rests = [len(row.prefill_ids) - n for row, n in zip(rows, cached, strict=True)]
        longest_rest = max(rests)
        return [
            (n + longest_rest if n else n + rest, row.budget)
            for row, n, rest in zip(rows, cached, rests, strict=True)
        ]

    def prompt_kv(self, i: int) -> KV:
        """Row `i`'s prompt keys and values (layers x 2 x H x prompt x D), between its prefill
        forward pass and `extend`: its prefix columns (if any) and its rest's."""
        row = self.rows[i]
        width = self.mask.width
        rest = len(row.prefill_ids) - row.cached_prompt_tokens
        prefix_end = width - self.input_ids.shape[1]
        parts = [slice(width - rest, width)]
        if row.cached_prompt_tokens:
            parts.insert(0, slice(prefix_end - row.cached_prompt_tokens, prefix_end))
        return torch.stack(
            [
                torch.stack(
                    (
                        torch.cat([k[i, :, part] for part in parts], dim=1),
                        torch.cat([v[i, :, part] for part in parts], dim=1),
                    )
                )
                for k, v in map(live, layers(self.cache))
            ]
        )

    def part(self) -> fused.Part:
        """This batch's inputs to a forward pass."""
        if self._attention is not None:
            return fused.Part(self.input_ids, self._attention, self.cache)
        window = self.mask.windows()[0]  # B x 1 x columns x 1
        attention = fused.Attention(self.slots.positions.unsqueeze(1), window.transpose(2, 3))
        return fused.Part(self.input_ids, attention, self.cache)

    def extend(self, other: Batch) -> Batch:
        """Take `other`'s rows (just prefilled by the same pass) into this batch: only they are
        copied, into spare slots, and the narrower side is left-padded to the wider."""
        width = max(self.mask.width, other.mask.width)
        for mine, theirs in zip(layers(self.cache), layers(other.cache), strict=True):
            mine.append_rows(*live(theirs), width)
        self.mask.append_rows(other.mask.windows(), width)
        self.slots.append(other.slots)
        # `input_ids` stay as they are: `advance` replaces them for every row.
        self._take_rows(other)
        return self

    def advance(self, logits: torch.Tensor, eos_ids: torch.Tensor) -> Step:
        """Pick every row's token from `logits` (B x vocab, fp32) and make it the next input;
        what the host learns of the step comes over in one transfer."""
        slots = self.slots
        tokens, step = self._pick(logits, slots, eos_ids)
        slots.tick(tokens)
        self.input_ids = tokens.unsqueeze(1)
        self.mask.fill_columns(1, True)
        self._attention = None
        self.passes += 1
        return step

    def filter(self, dropped: list[int]) -> Batch | None:
        """Drop the rows at indexes `dropped`: each hole below the new size takes a row from
        the end (`compaction`), and cache columns that are padding in every row left go."""
        if len(dropped) == len(self.rows):
            return None
        if not dropped:
            return self
        moves = self._drop_rows(dropped)
        # The mask is one column ahead of the cache (the next inputs'): the widest row left
        # spans `_widest + passes` of its columns, and every column before it is padding.
        drop_columns = self.mask.width - (self._widest + self.passes)
        self._compact(compaction_plan(len(self.rows), moves, drop_columns, self.input_ids.device))
        return self

    def _compact(self, plan: Compaction) -> None:
        for layer in layers(self.cache):
            layer.compact(plan)
        self.mask.compact(plan)
        self.slots.compact(plan)
        ids = self.input_ids
        if plan.dst is not None and plan.src is not None:
            ids[plan.dst] = ids[plan.src]
        self.input_ids = ids[: plan.rows]

    def restore_cache_length(self, length: int) -> None:
        """Undo a forward pass that failed half way (some layers appended, others not)."""
        for layer in layers(self.cache):
            if layer.is_initialized:
                layer.truncate(length)


def forward_all(lm: LoadedModel, batches: list[Batch], *, compiled: bool = False) -> torch.Tensor:
    """The next-token logits of every row of the batches, in order (rows x vocab, fp32); each
    cache grows by its inputs. One fused pass over all the batches where the model allows it,
    unless the model's own forward pass is `compiled`."""
    if fused.supports(lm.model) and not compiled:
        return fused.forward(lm.model, [batch.part() for batch in batches])
    logits = [forward(lm, batch) for batch in batches]
    return logits[0] if len(logits) == 1 else torch.cat(logits)


def forward(lm: LoadedModel, batch: Batch) -> torch.Tensor:
    """The model's own forward pass over one batch: next-token logits of every row."""
    part = batch.part()
    logits: torch.Tensor = lm.model(
        input_ids=batch.input_ids,
        attention_mask=batch.mask.windows()[0][:, 0, :, 0],
        position_ids=part.attention.positions,
        cache=batch.cache,
        use_cache=True,
        logits_to_keep=1,  # the LM head over whole prompts would cost more than the layers
    ).logits
    return logits[:, -1, :].float()
