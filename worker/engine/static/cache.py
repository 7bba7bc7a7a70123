"""The static decode path's KV cache: one preallocated tensor, a fixed number of slots, each with
room for a whole request.

Layout: (layers, 2, slots, KV heads, columns + 1, head dim), keys at [:, 0], values at [:, 1]. A
row owns a slot; its token at position p has its keys and values in column p, so a slot's real
columns are always [0, length) and one mask `column <= position` covers any row. The last column
is scratch: padding rows and padding tokens write there, and no row ever reads it.

Per-slot (rather than paged) because the decode step then reads each row's keys and values as a
plain strided view, `cache[:bucket, :, :columns]`, that SDPA takes as it is: no block table and
no gather of the pages into a contiguous tensor at every step, which would read the cache twice.
The price is that a request's prompt plus `max_new_tokens` must fit one slot (its `columns`):
the budget divided by the slots, or the model's context if smaller.

Every value is finite from the start (zeros) and stays so: a masked column still enters SDPA as
weight 0 times its value, and 0 x NaN is NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.model import LoadedModel
from worker.engine.prefix_cache import KV, PrefixHit

# Activations, the logits buffer aside, of the largest step on top of the weights and the cache,
# kept free when the cache is sized from a fraction of the GPU's memory.
ACTIVATION_RESERVE_BYTES = 2**30


@dataclass(frozen=True, slots=True)
class Geometry:
    slots: int
    columns: int  # tokens one slot holds: a request's prompt plus max_new_tokens at most
    source: str  # the settings it comes from, for error messages

    @property
    def tokens(self) -> int:
        return self.slots * self.columns


class CacheTooSmall(RuntimeError):
    pass


def geometry(
    lm: LoadedModel,
    slots: int,
    budget_tokens: int,
    memory_fraction: float,
    kv_bytes_per_token: int,
) -> Geometry:
    """`slots` slots sharing `budget_tokens` (GENQ_MAX_BATCH_TOKENS), or, with a GPU memory
    fraction, what that fraction of the device's memory leaves after the weights, a reserve
    for activations and the logits buffer. A slot holds at most the model's context."""
    source = "GENQ_MAX_BATCH_TOKENS / GENQ_MAX_BATCH_SIZE"
    if memory_fraction > 0 and lm.device.type == "cuda":
        total = torch.cuda.get_device_properties(lm.device).total_memory
        logits_bytes = slots * int(lm.model.config.vocab_size) * 4
        free = int(total * memory_fraction) - torch.cuda.memory_allocated(lm.device)
        free -= ACTIVATION_RESERVE_BYTES + 2 * logits_bytes
        budget_tokens = max(free, 0) // kv_bytes_per_token
        source = "GENQ_GPU_MEMORY_FRACTION / GENQ_MAX_BATCH_SIZE"
    columns = min(lm.max_context, budget_tokens // slots)
    if columns >= 16:
        columns -= columns % 16  # SDPA's kernels like a mask row aligned to 16 elements
    if columns < 2:
        raise CacheTooSmall(
            f"{budget_tokens} KV-cache tokens leave {columns} per slot for {slots} slots ({source})"
        )
    return Geometry(slots, columns, source)


class StaticCache:
    def __init__(self, lm: LoadedModel, geometry: Geometry) -> None:
        config = lm.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or (
            config.hidden_size // config.num_attention_heads
        )
        self.geometry = geometry
        self.scratch = geometry.columns  # the column nobody reads
        shape = (
            int(config.num_hidden_layers),
            2,
            geometry.slots,
            int(heads),
            geometry.columns + 1,
            int(head_dim),
        )
        self.kv = torch.zeros(shape, dtype=lm.dtype, device=lm.device)
        # Index tensors the passes slice from, built once.
        self.rows_index = torch.arange(geometry.slots, device=lm.device)
        self.columns_index = torch.arange(geometry.columns + 1, device=lm.device)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s keys and values, (slots, KV heads, columns + 1, head dim) each."""
        return self.kv[index, 0], self.kv[index, 1]

    def move(self, dst: torch.Tensor, src: torch.Tensor, columns: int) -> None:
        """Slots `dst` take the first `columns` columns of slots `src` (disjoint), every layer at
        once."""
        window = self.kv[:, :, :, :, :columns]
        window.index_copy_(2, dst, window.index_select(2, src))

    def zero(self, slots: list[int]) -> None:
        for slot in slots:
            self.kv[:, :, slot] = 0

    def clear(self) -> None:
        self.kv.zero_()

    def load_prefix(self, slot: int, hit: PrefixHit) -> None:
        """A cached prompt prefix's keys and values into the first columns of `slot`."""
        self.kv[:, :, slot, :, : hit.length] = hit.kv

    def prompt_kv(self, slot: int, length: int) -> KV:
        """A copy of the first `length` columns of `slot`, for the prefix cache."""
        return self.kv[:, :, slot, :, :length].clone()
