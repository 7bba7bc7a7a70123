"""What an engine serves: a loaded causal LM, its tokenizer and its limits (`worker.loading`
builds one from a checkpoint; tests and benchmarks build their own)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class LoadedModel:
    name: str  # name@version
    source: str
    model: Any  # a transformers PreTrainedModel; typed loosely since transformers ships no stubs
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    max_context: int
    load_s: float
    max_prompt_tokens: int | None = None  # the catalog's limit, below the context window
    compile: bool = False  # torch.compile asked for: the engine compiles what it runs
    # The smallest attention window of its sliding-window layers, when it bounds max_context.
    sliding_window: int | None = None

    @property
    def weight_bytes(self) -> int:
        tensors = [*self.model.parameters(), *self.model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)


def vocab(lm: LoadedModel) -> int:
    """The width of the model's logits: token ids a row may pick."""
    return int(lm.model.config.vocab_size)
