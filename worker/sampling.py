"""Next-token choice for one sequence: greedy, or seeded sampling with temperature/top-k/top-p."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from transformers import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks generate exactly max_new_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


_NO_IDS = torch.empty((1, 0), dtype=torch.long)


class Sampler:
    """Own generator per sequence, so a seeded request samples the same tokens whatever else
    shares its batch."""

    def __init__(self, params: SamplingParams, device: torch.device) -> None:
        self.params = params
        warpers = LogitsProcessorList()
        if not params.greedy:
            if params.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
        self._warpers = warpers
        self._generator = torch.Generator(device=device).manual_seed(params.seed)

    def next_token(self, logits: torch.Tensor) -> int:
        """`logits` (1, vocab) for the next position, in fp32."""
        if self.params.greedy:
            return int(logits.argmax(dim=-1).item())
        # These warpers never read the token history, so none is passed.
        scores = self._warpers(cast(torch.LongTensor, _NO_IDS), cast(torch.FloatTensor, logits))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator).item())
