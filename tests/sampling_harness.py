"""Sample next tokens from hand-made scores, as a batch's pass does, without a model."""

from __future__ import annotations

import torch

from worker.engine.sampling import Planner, SamplingParams, next_tokens
from worker.engine.slots import SlotTensors


def sample(
    logits: torch.Tensor, params: list[SamplingParams], positions: list[int] | int = 0
) -> list[int]:
    """Each row's token from `logits` (rows x vocab), drawn at its position of its stream."""
    slots = SlotTensors.of(params, [[0]] * len(params), logits.shape[1], logits.device)
    slots.generated.copy_(torch.tensor(positions))
    planner = Planner()
    planner.add(params)
    tokens, _ = next_tokens(
        logits.clone(),
        slots.temperature,
        slots.top_k,
        slots.top_p,
        slots.keys,
        slots.generated,
        planner.plan(params, logits.device),
        slots.min_p,
    )
    return [int(t) for t in tokens.tolist()]
