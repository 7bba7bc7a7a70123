"""Process and GPU memory, checked before rows are admitted (`worker.metrics` exports the same
reading), and what a batch's KV cache takes."""

from __future__ import annotations

from collections.abc import Iterable

import psutil
import torch

from worker.engine.model import LoadedModel


def kv_bytes_per_token(lm: LoadedModel) -> int:
    """Bytes one token occupies in the KV cache: keys and values of every layer."""
    config = lm.model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty((), dtype=lm.dtype).element_size()
    return 2 * int(config.num_hidden_layers) * int(heads) * int(head_dim) * itemsize


def padded_peak(rows: Iterable[tuple[int, int]]) -> int:
    """The most KV-cache tokens a left-padded batch holds over the steps to come.

    Each row is (span, steps): the cache columns it spans at the next forward pass (from its
    first real column to the last, padding inside it included), and the forward passes it has
    left if it runs to `max_new_tokens`. Every row sits in the batch's last columns, so the cache
    is as wide as its widest row; each step adds one column, and a row leaves after its last
    step. At step k the cache holds (rows with steps > k) x (their widest span + k). While no row
    leaves, that grows with k, so the peak is at some row's last step: one sweep over the rows,
    longest-lived first, finds it.
    """
    peak = widest = 0
    longest_lived_first = sorted(rows, key=lambda row: row[1], reverse=True)
    # At this row's last step, k = steps - 1, the rows before it are still there.
    for count, (span, steps) in enumerate(longest_lived_first, start=1):
        widest = max(widest, span)
        peak = max(peak, count * (widest + steps - 1))
    return peak


class MemoryMonitor:
    """Usage is GPU memory allocated by torch on CUDA, the process's resident set on the CPU."""

    def __init__(self, device: torch.device, limit_bytes: int) -> None:
        self.device = device
        self.limit_bytes = limit_bytes
        self._process = psutil.Process()

    def usage_bytes(self) -> int:
        """What the memory limit is checked against."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return self.rss_bytes()

    def rss_bytes(self) -> int:
        return int(self._process.memory_info().rss)

    def can_admit(self, extra_bytes: int) -> bool:
        """Whether `extra_bytes` more keep usage under the limit (always, without a limit)."""
        return not self.limit_bytes or self.usage_bytes() + extra_bytes <= self.limit_bytes

    def release(self) -> None:
        """Hand cached GPU blocks back to the driver (nothing to do on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
