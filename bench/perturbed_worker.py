"""A genq worker whose next-token scores are perturbed before every pick: a job re-run on it
samples other tokens than its first attempt did, as a re-run on other hardware (another batch,
another reduction order in bf16) may. For the tests of resumed streams and `bench.faults`.

    python -m bench.perturbed_worker worker     # same settings as `genq worker`
"""

from __future__ import annotations

import torch

from genq.cli import main
from worker.engine import rows
from worker.engine.sampling import Plan
from worker.engine.slots import SlotTensors

# The perturbation's size, against the tiny test models' scores (a few units at most).
SCALE = 10.0

_pick = rows.pick_tokens
_noise: dict[tuple[int, torch.device], torch.Tensor] = {}


def _perturbed_pick(
    logits: torch.Tensor,
    slots: SlotTensors,
    plan: Plan,
    eos_ids: torch.Tensor,
    banned: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's pick over the scores plus a fixed noise per token (masked tokens stay
    masked: -inf plus noise is -inf)."""
    key = (logits.shape[1], logits.device)
    if key not in _noise:
        generator = torch.Generator().manual_seed(0)
        _noise[key] = (torch.randn(key[0], generator=generator) * SCALE).to(logits.device)
    return _pick(logits + _noise[key], slots, plan, eos_ids, banned)


if __name__ == "__main__":
    rows.pick_tokens = _perturbed_pick
    raise SystemExit(main(["worker"]))
