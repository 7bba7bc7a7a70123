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

# Dividing logits by a tinier temperature overflows them; in the limit it is greedy anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5
_MAX_SCORE = torch.finfo(torch.float32).max


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
        return self.temperature < GREEDY_BELOW_TEMPERATURE


def sanitize(logits: torch.Tensor) -> torch.Tensor:
    """fp32 logits with NaN turned into -inf (never chosen) and +inf into the largest float, so
    argmax and softmax see only what they can rank; a row left with no finite logit cannot be
    sampled at all."""
    return torch.nan_to_num(logits, nan=-torch.inf, posinf=_MAX_SCORE, neginf=-torch.inf)


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
        """`logits` (1, vocab) for the next position, in fp32, with at least one finite value."""
        clean = sanitize(logits)
        if self.params.greedy:
            return int(clean.argmax(dim=-1).item())
        # Shifted so that the best score is 0 whatever the temperature: the softmax below always
        # has a finite maximum, and multinomial never sees NaN (on CUDA that would be a
        # device-side assert, which ends the whole CUDA context, not just this row).
        shifted = clean - clean.amax(dim=-1, keepdim=True)
        # These warpers never read the token history, so none is passed.
        scores = self._warpers(cast(torch.LongTensor, _NO_IDS), cast(torch.FloatTensor, shifted))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator).item())
