"""The batch's KV cache: per layer, keys and values in buffers with spare rows and columns.

DynamicLayer re-concatenates the whole cache at every step, and its batch surgery copies every
row; at batch 16 on a CPU those copies cost as much as the model's matmuls. Here a step writes
its column into spare room, an admitted row is written into a spare row slot, a finished row's
slot is refilled by one row moved from the end, and columns that became padding are dropped by
moving the window's start: surgery copies the rows it changes, never the whole cache, and builds
its index tensors once for every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from worker.engine.compaction import Compaction
from worker.engine.generation import GenerationError
from worker.engine.model import LoadedModel
from worker.engine.prefix_cache import PrefixHit


class SlotBuffer:
    """Tensors of shape (rows, A, columns, B) with a shared geometry, each kept in a buffer with
    spare rows and columns: the live window is `buffer[:rows, :, start:end]`."""

    ROW_SLACK = 8
    COLUMN_SLACK = 128

    def __init__(self) -> None:
        self._bufs: list[torch.Tensor] = []
        self.rows = self.start = self.end = 0

    @property
    def width(self) -> int:
        return self.end - self.start

    @property
    def device(self) -> torch.device:
        return self._bufs[0].device

    def windows(self) -> list[torch.Tensor]:
        return [buf[: self.rows, :, self.start : self.end] for buf in self._bufs]

    def write(self, columns: Sequence[torch.Tensor]) -> None:
        """Append columns (rows x A x n x B each) to every live row."""
        new = columns[0].shape[2]
        if not self._bufs:
            self.rows = columns[0].shape[0]
            self._allocate(columns, rows=self.rows, left=0, extra=new)
        assert columns[0].shape[0] == self.rows, "a step feeds every row of the batch"
        if self.end + new > self._bufs[0].shape[2]:
            self._allocate(columns, rows=self.rows, left=0, extra=new)
        for buf, column in zip(self._bufs, columns, strict=True):
            buf[: self.rows, :, self.end : self.end + new] = column
        self.end += new

    def append_rows(self, windows: Sequence[torch.Tensor], width: int) -> None:
        """Add rows whose windows (n x A x T x B, T <= `width`) are right-aligned with this
        buffer's; the window grows to `width` columns by padding (zeros) on the left."""
        rows = self.rows + windows[0].shape[0]
        grow = width - self.width
        if rows > self._bufs[0].shape[0] or grow > self.start:
            self._allocate(windows, rows=rows, left=max(grow, 0), extra=0)
        if grow > 0:
            self.start -= grow
            self._zero(slice(0, self.rows), self.start, self.start + grow)
        first, cached = self.rows, windows[0].shape[2]
        self._zero(slice(first, rows), self.start, self.end - cached)
        for buf, window in zip(self._bufs, windows, strict=True):
            buf[first:rows, :, self.end - cached : self.end] = window
        self.rows = rows

    def compact(self, plan: Compaction) -> None:
        if plan.dst is not None and plan.src is not None:
            live = slice(self.start, self.end)
            for buf in self._bufs:
                buf[plan.dst, :, live] = buf[plan.src, :, live]
        self.rows = plan.rows
        self.start += plan.drop_columns

    def fill_columns(self, n: int, value: bool | float) -> None:
        """Append `n` columns holding `value` to every live row."""
        if self.end + n > self._bufs[0].shape[2]:
            self._allocate(self._bufs, rows=self.rows, left=0, extra=n)
        for buf in self._bufs:
            buf[: self.rows, :, self.end : self.end + n] = value
        self.end += n

    def truncate(self, width: int) -> None:
        self.end = self.start + width

    def _allocate(self, likes: Sequence[torch.Tensor], rows: int, left: int, extra: int) -> None:
        """Move the window into new buffers with room for `rows` rows, and for `left` more
        columns on its left and `extra` plus COLUMN_SLACK on its right."""
        width, window = self.width, slice(self.start, self.end)
        bufs = []
        for index, like in enumerate(likes):
            shape = (
                rows + self.ROW_SLACK,
                like.shape[1],
                left + width + extra + self.COLUMN_SLACK,
                like.shape[3],
            )
            buf = like.new_empty(shape)
            if width:
                live = slice(0, self.rows)
                buf[live, :, left : left + width] = self._bufs[index][live, :, window]
            bufs.append(buf)
        self._bufs = bufs
        self.start, self.end = left, left + width

    def _zero(self, rows: slice, start: int, stop: int) -> None:
        # Padding is masked out, but a masked score is still q.k + -inf: garbage in a fresh
        # buffer (NaN bit patterns) would poison it.
        if stop > start:
            for buf in self._bufs:
                buf[rows, :, start:stop] = 0


class SlotLayer(DynamicLayer):  # type: ignore[no-untyped-call]  # untyped base
    """One layer's keys and values in a SlotBuffer; `keys`/`values` are its live windows."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.slots = SlotBuffer()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.slots.write([key_states, value_states])
        return self._publish()

    def append_rows(self, keys: torch.Tensor, values: torch.Tensor, width: int) -> None:
        self.slots.append_rows([keys, values], width)
        self._publish()

    def compact(self, plan: Compaction) -> None:
        self.slots.compact(plan)
        self._publish()

    def truncate(self, width: int) -> None:
        self.slots.truncate(width)
        self._publish()

    def _publish(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys, self.values = self.slots.windows()
        return self.keys, self.values


def new_cache(lm: LoadedModel) -> DynamicCache:
    cache = DynamicCache(config=lm.model.config)
    cache.layers = [SlotLayer() for _ in cache.layers]
    return cache


def layers(cache: DynamicCache) -> list[SlotLayer]:
    return cast(list[SlotLayer], cache.layers)


def live(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = layer.keys, layer.values
    assert keys is not None, "layer never ran"
    assert values is not None, "layer never ran"
    return keys, values


def load_prefixes(cache: DynamicCache, hits: list[PrefixHit | None], width: int) -> None:
    """Fill a fresh cache with each row's cached prefix, right-aligned to `width` columns."""
    some = next(hit for hit in hits if hit is not None)
    heads, head_dim = some.kv.shape[2], some.kv.shape[4]
    for index, layer in enumerate(layers(cache)):
        both = some.kv.new_zeros((2, len(hits), heads, width, head_dim))
        for i, hit in enumerate(hits):
            if hit is not None:
                both[:, i, :, width - hit.length :] = hit.kv[index]
        layer.update(both[0], both[1])


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
