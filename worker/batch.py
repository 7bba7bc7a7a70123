"""A batch of sequences decoded together, with TGI's lifecycle: `prefill` a batch from new
requests, `forward_all` (one forward pass over the running batch and the prefill batch),
`advance` (one token per row, finished rows filtered out), `concatenate` the prefilled batch into
the running one.

Rows are left-padded: every row's next token sits in the last column, so one forward pass feeds
them all. Padding is masked out by `attention_mask`; positions come from the mask, so a row's
positions are those it would have alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from common.schemas import FinishReason
from worker import fused
from worker.generation import (
    DetokenizationError,
    Generation,
    GenerationError,
    NumericalError,
    is_device_error,
)
from worker.loading import LoadedModel
from worker.prefix_cache import KV, PrefixHit
from worker.sampling import Sampler, SamplingParams, sanitize
from worker.textstream import TextStream


@dataclass(eq=False)
class Row:
    """One sequence: its request, its own sampler and detokenizer, and what it generated."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    stream: TextStream
    started: float = field(default_factory=time.perf_counter)
    token_ids: list[int] = field(default_factory=list)
    first_token_s: float | None = None
    finish: FinishReason | None = None
    cached_prompt_tokens: int = 0
    cache_scope: str = ""  # the prefix-cache partition of its prompt (an API key)

    def generation(self) -> Generation:
        assert self.finish is not None
        generation_s = time.perf_counter() - self.started
        first = self.first_token_s
        return Generation(
            text=self.stream.text,
            finish_reason=self.finish,
            prompt_tokens=len(self.prompt_ids),
            cached_prompt_tokens=self.cached_prompt_tokens,
            token_ids=self.token_ids,
            time_to_first_token_s=first,
            generation_s=generation_s,
            prefill_s=first,
            decode_s=None if first is None else generation_s - first,
        )

    @property
    def reserved_tokens(self) -> int:
        """KV-cache tokens this row may grow to, alone."""
        return len(self.prompt_ids) + self.params.max_new_tokens

    @property
    def steps_left(self) -> int:
        """Forward passes to go if the row runs to `max_new_tokens`."""
        return self.params.max_new_tokens - len(self.token_ids)

    def end(self, reason: FinishReason, text: str = "") -> RowOutput:
        """The row's last output: `text`, whatever its stream held back, and the generation."""
        self.finish = reason
        try:
            text += self.stream.flush()
        except DetokenizationError as e:
            return RowOutput(self.request_id, error=e)
        return RowOutput(self.request_id, text, finished=self.generation())


@dataclass(frozen=True, slots=True)
class RowOutput:
    """What one step produced for one request: new text, and the outcome once it has ended."""

    request_id: str
    text: str = ""
    finished: Generation | None = None
    error: GenerationError | None = None

    @property
    def ended(self) -> bool:
        return self.finished is not None or self.error is not None


def new_row(
    lm: LoadedModel,
    request_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
    cache_scope: str = "",
) -> Row:
    return Row(
        request_id=request_id,
        prompt_ids=prompt_ids,
        params=params,
        sampler=Sampler(params, lm.device),
        stream=TextStream(lm.tokenizer, prompt_ids, list(params.stop)),
        cache_scope=cache_scope,
    )


class Batch:
    """`input_ids` (B, q) are the tokens to feed next: whole prompts before the first step, one
    token per row after. `attention_mask` (B, cached + q) covers the cache and those inputs.
    """

    def __init__(
        self,
        rows: list[Row],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: DynamicCache,
    ) -> None:
        self.rows = rows
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.cache = cache

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def cached_tokens(self) -> int:
        return self.attention_mask.shape[1] - self.input_ids.shape[1]

    def extents(self) -> list[tuple[int, int]]:
        """Each row's (span, steps) for `padded_peak`: the cache columns it spans at the next
        forward pass, from its first real one, and the forward passes it has left."""
        first_real = self.attention_mask.argmax(dim=1)  # the mask is 0s, then 1s (and gaps)
        spans: list[int] = (self.attention_mask.shape[1] - first_real).tolist()
        return [(span, row.steps_left) for span, row in zip(spans, self.rows, strict=True)]

    @classmethod
    def prefill(
        cls, lm: LoadedModel, rows: list[Row], prefixes: list[PrefixHit | None] | None = None
    ) -> Batch:
        """A batch that feeds the rows' prompts. A row with a cached prefix feeds only the rest:
        its cache holds the prefix, and its mask reads [pad, prefix, pad, rest]."""
        hits = prefixes or [None] * len(rows)
        cached = [hit.length if hit else 0 for hit in hits]
        for row, n in zip(rows, cached, strict=True):
            row.cached_prompt_tokens = n
        prefix_width = max(cached)
        rests = [row.prompt_ids[n:] for row, n in zip(rows, cached, strict=True)]
        longest = max(map(len, rests))
        pad = lm.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), prefix_width + longest), dtype=torch.long)
        for i, (rest, n) in enumerate(zip(rests, cached, strict=True)):
            ids[i, longest - len(rest) :] = torch.tensor(rest)
            mask[i, prefix_width - n : prefix_width] = 1
            mask[i, prefix_width + longest - len(rest) :] = 1
        cache = new_cache(lm)
        if prefix_width:
            _load_prefixes(cache, hits, prefix_width)
        return cls(rows, ids.to(lm.device), mask.to(lm.device), cache)

    @staticmethod
    def prefill_extents(rows: list[Row], prefixes: list[PrefixHit | None]) -> list[tuple[int, int]]:
        """`extents` of the rows once `prefill(rows, prefixes)` has run its forward pass: a row
        spans its prompt, or, with a cached prefix, the prefix and the longest rest."""
        cached = [hit.length if hit else 0 for hit in prefixes]
        rests = [len(row.prompt_ids) - n for row, n in zip(rows, cached, strict=True)]
        longest_rest = max(rests)
        return [
            (n + longest_rest if n else n + rest, row.steps_left)
            for row, n, rest in zip(rows, cached, rests, strict=True)
        ]

    def prompt_kv(self, i: int) -> KV:
        """Row `i`'s prompt keys and values (1 x H x prompt x D per layer), between its prefill
        `forward` and `advance`, when the cache holds exactly what the mask covers."""
        columns = self.attention_mask[i].nonzero().squeeze(1)
        return [
            (k[i : i + 1, :, columns], v[i : i + 1, :, columns])
            for k, v in map(_kv, _layers(self.cache))
        ]

    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        """Merge decoding batches into the first one's cache: only the admitted rows are copied
        (into spare slots), and the shorter side is left-padded to the longer."""
        running = batches[0]
        for other in batches[1:]:
            running.extend(other)
        return running

    def extend(self, other: Batch) -> None:
        width = max(self.cached_tokens, other.cached_tokens)
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            mine.append_rows(*_kv(theirs), width)
        masks = (self.attention_mask, other.attention_mask)
        self.attention_mask = torch.cat([_pad_left(m, width + 1 - m.shape[1], 1) for m in masks])
        self.input_ids = torch.cat([self.input_ids, other.input_ids])
        self.rows += other.rows

    def filter(self, keep: list[int]) -> Batch | None:
        """Keep rows at indexes `keep`, in the order `_compact` gives (only rows that fill a
        dropped row's slot move); drop cache columns that are padding in every kept row."""
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        order = _compact(keep)
        index = torch.tensor(order, device=self.input_ids.device)
        mask = self.attention_mask[index]
        # Columns before the longest kept row's first real token are pure padding now.
        first_real = int(mask.any(dim=0).nonzero()[0])
        for layer in _layers(self.cache):
            layer.keep_rows(order, drop_columns=first_real)
        rows = [self.rows[i] for i in order]
        return Batch(rows, self.input_ids[index], mask[:, first_real:], self.cache)

    def restore_cache_length(self, length: int) -> None:
        """Undo a forward pass that failed half way (some layers appended, others not)."""
        for layer in _layers(self.cache):
            if layer.is_initialized:
                layer.truncate(length)


class SlotLayer(DynamicLayer):  # type: ignore[no-untyped-call]  # untyped base
    """One layer's keys and values, kept in a buffer with spare rows and columns.

    `keys`/`values` are views of the live window `buf[:rows, :, start:end]`. DynamicLayer
    re-concatenates the whole cache at every step, and its batch surgery copies every row; at
    batch 16 on a CPU those copies cost as much as the model's matmuls. Here a step writes its
    column into spare room, an admitted row is written into a spare row slot, a finished row's
    slot is refilled by one row moved from the end, and columns that became padding are dropped
    by moving `start`: surgery copies the rows it changes, never the whole cache.
    """

    ROW_SLACK = 8
    COLUMN_SLACK = 128

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._key_buf = torch.empty(0)
        self._value_buf = torch.empty(0)
        self._rows = self._start = self._end = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._allocate(key_states, rows=key_states.shape[0], left=0, extra=new)
            self._rows = key_states.shape[0]
        assert key_states.shape[0] == self._rows, "a step feeds every row of the batch"
        if self._end + new > self._key_buf.shape[2]:
            self._allocate(key_states, rows=self._rows, left=0, extra=new)
        self._key_buf[: self._rows, :, self._end : self._end + new] = key_states
        self._value_buf[: self._rows, :, self._end : self._end + new] = value_states
        self._end += new
        return self._publish()

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        """Add rows whose caches (`keys`, `values`: B x H x T x D, T <= `width`) are right-aligned
        with this layer's; the window grows to `width` columns by padding on the left."""
        rows = self._rows + keys.shape[0]
        grow = width - (self._end - self._start)
        if rows > self._key_buf.shape[0] or grow > self._start:
            self._allocate(keys, rows=rows, left=max(grow, 0), extra=0)
        if grow > 0:
            self._start -= grow
            self._zero(slice(0, self._rows), self._start, self._start + grow)
        first, cached = self._rows, keys.shape[2]
        self._zero(slice(first, rows), self._start, self._end - cached)
        self._key_buf[first:rows, :, self._end - cached : self._end] = keys
        self._value_buf[first:rows, :, self._end - cached : self._end] = values
        self._rows = rows
        self._publish()

    def keep_rows(self, order: list[int], drop_columns: int) -> None:
        """Slot i takes the row that was in slot `order[i]`; the first `drop_columns` columns of
        the window are dropped."""
        moves = [(i, j) for i, j in enumerate(order) if i != j]
        if moves:
            device = self._key_buf.device
            dst = torch.tensor([i for i, _ in moves], device=device)
            src = torch.tensor([j for _, j in moves], device=device)
            window = slice(self._start, self._end)
            self._key_buf[dst, :, window] = self._key_buf[src, :, window]
            self._value_buf[dst, :, window] = self._value_buf[src, :, window]
        self._rows = len(order)
        self._start += drop_columns
        self._publish()

    def truncate(self, length: int) -> None:
        self._end = self._start + length
        self._publish()

    def _allocate(self, like: torch.Tensor, rows: int, left: int, extra: int) -> None:
        """Move the window into a new buffer with room for `rows` rows, and for `left` more
        columns on its left and `extra` plus COLUMN_SLACK on its right."""
        width = self._end - self._start
        shape = (
            rows + self.ROW_SLACK,
            like.shape[1],
            left + width + extra + self.COLUMN_SLACK,
            like.shape[3],
        )
        key_buf, value_buf = like.new_empty(shape), like.new_empty(shape)
        if width:
            live, window = slice(0, self._rows), slice(self._start, self._end)
            key_buf[live, :, left : left + width] = self._key_buf[live, :, window]
            value_buf[live, :, left : left + width] = self._value_buf[live, :, window]
        self._key_buf, self._value_buf = key_buf, value_buf
        self._start, self._end = left, left + width

    def _zero(self, rows: slice, start: int, stop: int) -> None:
        # Padding is masked out, but a masked score is still q.k + -inf: garbage in a fresh
        # buffer (NaN bit patterns) would poison it.
        if stop > start:
            self._key_buf[rows, :, start:stop] = 0
            self._value_buf[rows, :, start:stop] = 0

    def _publish(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = self._key_buf[: self._rows, :, self._start : self._end]
        self.values = self._value_buf[: self._rows, :, self._start : self._end]
        return self.keys, self.values


def new_cache(lm: LoadedModel) -> DynamicCache:
    cache = DynamicCache(config=lm.model.config)
    cache.layers = [SlotLayer() for _ in cache.layers]
    return cache


def _layers(cache: DynamicCache) -> list[SlotLayer]:
    return cast(list[SlotLayer], cache.layers)


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = layer.keys, layer.values
    assert keys is not None, "layer never ran"
    assert values is not None, "layer never ran"
    return keys, values


def _load_prefixes(cache: DynamicCache, hits: list[PrefixHit | None], width: int) -> None:
    """Fill a fresh cache with each row's cached prefix, right-aligned to `width` columns."""
    some = next(hit for hit in hits if hit is not None)
    for index, layer in enumerate(_layers(cache)):
        like = some.kv[index][0]
        shape = (len(hits), like.shape[1], width, like.shape[3])
        keys, values = like.new_zeros(shape), like.new_zeros(shape)
        for i, hit in enumerate(hits):
            if hit is not None:
                k, v = hit.kv[index]
                keys[i, :, width - hit.length :] = k[0]
                values[i, :, width - hit.length :] = v[0]
        layer.update(keys, values)


def _compact(keep: list[int]) -> list[int]:
    """The new slot order once only the rows at `keep` (ascending) remain: kept rows below the
    new size stay where they are, and each hole below it takes a kept row from above it."""
    size = len(keep)
    kept = set(keep)
    movers = iter(i for i in keep if i >= size)
    return [i if i in kept else next(movers) for i in range(size)]


def check_supported(lm: LoadedModel) -> None:
    """The batch surgery above needs plain growing caches: full attention in every layer, or
    sliding-window layers whose window bounds the context (`LoadedModel.sliding_window`), where
    full attention is the same thing."""
    for layer in DynamicCache(config=lm.model.config).layers:
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise GenerationError(
                f"the batching engine supports full-attention decoder models; {lm.name} has "
                f"{type(layer).__name__} cache layers"
            )


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def forward_all(lm: LoadedModel, batches: list[Batch]) -> list[torch.Tensor]:
    """The next-token logits of every row of each batch (B x vocab, fp32); each cache grows by
    its inputs. One fused pass over all the batches where the model allows it."""
    if fused.supports(lm.model) and not lm.compiled:
        parts = [fused.Part(b.input_ids, b.attention_mask, b.cache) for b in batches]
        return fused.forward(lm.model, parts)
    return [forward(lm, batch) for batch in batches]


def forward(lm: LoadedModel, batch: Batch) -> torch.Tensor:
    """The model's own forward pass over one batch: next-token logits of every row."""
    positions = (batch.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    positions = positions[:, -batch.input_ids.shape[1] :]
    logits: torch.Tensor = lm.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=positions,
        cache=batch.cache,
        use_cache=True,
        logits_to_keep=1,  # the LM head over whole prompts would cost more than the layers
    ).logits
    return logits[:, -1, :].float()


def advance(
    lm: LoadedModel, batch: Batch, logits: torch.Tensor
) -> tuple[list[RowOutput], Batch | None]:
    """Pick every row's token from `logits`, stream its text, and drop the rows that ended. A
    row whose scores cannot be sampled, or whose text cannot be decoded, fails alone."""
    now = time.perf_counter()
    outputs: list[RowOutput] = []
    keep: list[int] = []
    next_ids: list[int] = []
    logits = sanitize(logits)
    # One transfer for every row: its best token, and whether it has a finite score at all.
    best = torch.stack((logits.argmax(dim=-1), logits.amax(dim=-1).isfinite().long()))
    greedy, usable = best.tolist()
    for i, row in enumerate(batch.rows):
        token = 0  # fed for a failed row until `filter` drops it
        try:
            token = _next_token(row, logits[i : i + 1], greedy[i], usable[i])
            output = _take(lm, row, token, now)
        except GenerationError as e:
            output = RowOutput(row.request_id, error=e)
        if output is not None:
            outputs.append(output)
        if output is None or not output.ended:
            keep.append(i)
        next_ids.append(token)
    batch.input_ids = torch.tensor(next_ids, device=batch.input_ids.device).unsqueeze(1)
    batch.attention_mask = torch.cat(
        [batch.attention_mask, batch.attention_mask.new_ones((len(batch), 1))], dim=1
    )
    return outputs, batch.filter(keep)


def _next_token(row: Row, logits: torch.Tensor, greedy: int, usable: bool) -> int:
    if not usable:
        raise NumericalError("the model's next-token scores for this request are all NaN or -inf")
    if row.params.greedy:
        return greedy
    try:
        return row.sampler.next_token(logits)
    except Exception as e:
        if is_device_error(e):
            raise  # the whole step's: the device cannot go on
        raise NumericalError(f"sampling the next token failed: {e}") from e


def _take(lm: LoadedModel, row: Row, token: int, now: float) -> RowOutput | None:
    """Append `token` to the row: its new text, or its last output if the row ends here."""
    row.token_ids.append(token)
    if row.first_token_s is None:
        row.first_token_s = now - row.started
    if token in lm.eos_token_ids and not row.params.ignore_eos:
        return row.end("stop")
    text = row.stream.push(token)
    if row.stream.stopped:
        return row.end("stop", text)
    if len(row.token_ids) >= row.params.max_new_tokens:
        return row.end("length", text)
    return RowOutput(row.request_id, text) if text else None
