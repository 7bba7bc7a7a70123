"""A batch of sequences decoded together, with TGI's lifecycle: `prefill` a batch from new
requests, `generate_token` (one forward pass, one token per row), `concatenate` a prefilled batch
into the running one, `filter` out finished rows.

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
from transformers.cache_utils import DynamicLayer

from common.schemas import FinishReason
from worker.generation import Generation, GenerationError
from worker.loading import LoadedModel
from worker.sampling import Sampler, SamplingParams
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

    def generation(self) -> Generation:
        assert self.finish is not None
        return Generation(
            text=self.stream.text,
            finish_reason=self.finish,
            prompt_tokens=len(self.prompt_ids),
            token_ids=self.token_ids,
            time_to_first_token_s=self.first_token_s,
            generation_s=time.perf_counter() - self.started,
        )

    @property
    def reserved_tokens(self) -> int:
        """KV-cache tokens this row may grow to."""
        return len(self.prompt_ids) + self.params.max_new_tokens


@dataclass(frozen=True, slots=True)
class RowOutput:
    """What one step produced for one request: new text, and the outcome once it has ended."""

    request_id: str
    text: str = ""
    finished: Generation | None = None
    error: GenerationError | None = None


def new_row(lm: LoadedModel, request_id: str, prompt_ids: list[int], params: SamplingParams) -> Row:
    return Row(
        request_id=request_id,
        prompt_ids=prompt_ids,
        params=params,
        sampler=Sampler(params, lm.device),
        stream=TextStream(lm.tokenizer, prompt_ids, list(params.stop)),
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

    @property
    def reserved_tokens(self) -> int:
        return sum(row.reserved_tokens for row in self.rows)

    @classmethod
    def prefill(cls, lm: LoadedModel, rows: list[Row]) -> Batch:
        longest = max(len(r.prompt_ids) for r in rows)
        pad = lm.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.prompt_ids)
            ids[i, longest - n :] = torch.tensor(row.prompt_ids)
            mask[i, longest - n :] = 1
        return cls(rows, ids.to(lm.device), mask.to(lm.device), new_cache(lm))

    @classmethod
    def concatenate(cls, batches: list[Batch]) -> Batch:
        """Merge decoding batches: shorter caches are left-padded to the longest."""
        if len(batches) == 1:
            return batches[0]
        longest = max(b.cached_tokens for b in batches)
        pads = [longest - b.cached_tokens for b in batches]
        merged = [_layers(b.cache) for b in batches]
        for i, layer in enumerate(merged[0]):
            keys, values = zip(*(_kv(layers[i]) for layers in merged), strict=True)
            layer.keys = torch.cat([_pad_left(k, n, 2) for k, n in zip(keys, pads, strict=True)])
            layer.values = torch.cat(
                [_pad_left(v, n, 2) for v, n in zip(values, pads, strict=True)]
            )
        masks = [_pad_left(b.attention_mask, n, 1) for b, n in zip(batches, pads, strict=True)]
        return cls(
            [row for b in batches for row in b.rows],
            torch.cat([b.input_ids for b in batches]),
            torch.cat(masks),
            batches[0].cache,
        )

    def filter(self, keep: list[int]) -> Batch | None:
        """Keep rows at indexes `keep`; drop cache columns that are padding in every kept row."""
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        index = torch.tensor(keep, device=self.input_ids.device)
        mask = self.attention_mask[index]
        # Columns before the longest kept row's first real token are pure padding now.
        first_real = int(mask.any(dim=0).nonzero()[0])
        self.cache.batch_select_indices(index)
        if first_real:
            _slice_cache(self.cache, first_real, None)
        rows = [self.rows[i] for i in keep]
        return Batch(rows, self.input_ids[index], mask[:, first_real:], self.cache)

    def restore_cache_length(self, length: int) -> None:
        """Undo a forward pass that failed half way (some layers appended, others not)."""
        _slice_cache(self.cache, 0, length)


class GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]  # untyped base
    """A DynamicLayer that appends into spare capacity.

    DynamicLayer concatenates the whole cache with each step's keys and values; at batch 16 on a
    CPU that copy costs as much as the model's matmuls. Here a step writes into a buffer with
    room to spare, and `keys`/`values` are views of it. Batch surgery (concatenate, filter)
    replaces `keys`/`values` with new tensors; the next update notices and re-buffers once.
    """

    SLACK_TOKENS = 128

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._key_buf: torch.Tensor | None = None
        self._value_buf: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[2]
        if not self._owns_views(key_states.shape[0], end):
            self._rebuffer(key_states, value_states, length, end)
        assert self._key_buf is not None
        assert self._value_buf is not None
        self._key_buf[:, :, length:end] = key_states
        self._value_buf[:, :, length:end] = value_states
        self.keys = self._key_buf[:, :, :end]
        self.values = self._value_buf[:, :, :end]
        return self.keys, self.values

    def _owns_views(self, batch_size: int, end: int) -> bool:
        buf = self._key_buf
        keys = self.keys
        return (
            buf is not None
            and keys is not None
            and buf.data_ptr() == keys.data_ptr()
            and buf.shape[0] == batch_size
            and buf.shape[2] >= end
        )

    def _rebuffer(self, k: torch.Tensor, v: torch.Tensor, length: int, end: int) -> None:
        shape = (k.shape[0], k.shape[1], end + self.SLACK_TOKENS, k.shape[3])
        key_buf, value_buf = k.new_empty(shape), v.new_empty(shape)
        if length:
            keys, values = _kv(self)
            key_buf[:, :, :length] = keys
            value_buf[:, :, :length] = values
        self._key_buf, self._value_buf = key_buf, value_buf


def new_cache(lm: LoadedModel) -> DynamicCache:
    cache = DynamicCache(config=lm.model.config)
    cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    # check_supported() made sure every layer is a DynamicLayer.
    return cast(list[DynamicLayer], cache.layers)


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = layer.keys, layer.values
    assert keys is not None, "layer never ran"
    assert values is not None, "layer never ran"
    return keys, values


def _slice_cache(cache: DynamicCache, start: int, stop: int | None) -> None:
    """Keep cache positions [start:stop] in every layer."""
    for layer in _layers(cache):
        if layer.is_initialized:
            keys, values = _kv(layer)
            layer.keys = keys[:, :, start:stop]
            layer.values = values[:, :, start:stop]


def check_supported(lm: LoadedModel) -> None:
    """The batch surgery above needs plain growing caches (full attention in every layer)."""
    for layer in DynamicCache(config=lm.model.config).layers:
        if type(layer) is not DynamicLayer:
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


def generate_token(lm: LoadedModel, batch: Batch) -> tuple[list[RowOutput], Batch | None]:
    """One forward pass over the batch: a token for every row, their text, finished rows out."""
    positions = (batch.attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    positions = positions[:, -batch.input_ids.shape[1] :]
    logits = (
        lm.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=positions,
            cache=batch.cache,
            use_cache=True,
            logits_to_keep=1,  # the LM head over whole prompts would cost more than the layers
        )
        .logits[:, -1, :]
        .float()
    )
    now = time.perf_counter()
    outputs: list[RowOutput] = []
    keep: list[int] = []
    next_ids: list[int] = []
    greedy = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(batch.rows):
        token = greedy[i] if row.params.greedy else row.sampler.next_token(logits[i : i + 1])
        row.token_ids.append(token)
        if row.first_token_s is None:
            row.first_token_s = now - row.started
        text = ""
        if token in lm.eos_token_ids and not row.params.ignore_eos:
            row.finish = "stop"
        else:
            text = row.stream.push(token)
            if row.stream.stopped:
                row.finish = "stop"
            elif len(row.token_ids) >= row.params.max_new_tokens:
                row.finish = "length"
        if row.finish is not None:
            text += row.stream.flush()
            outputs.append(RowOutput(row.request_id, text, finished=row.generation()))
        else:
            if text:
                outputs.append(RowOutput(row.request_id, text))
            keep.append(i)
        next_ids.append(token)
    batch.input_ids = torch.tensor(next_ids, device=batch.input_ids.device).unsqueeze(1)
    batch.attention_mask = torch.cat(
        [batch.attention_mask, batch.attention_mask.new_ones((len(batch), 1))], dim=1
    )
    return outputs, batch.filter(keep)
