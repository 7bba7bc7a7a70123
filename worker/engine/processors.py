"""What a row's scores go through before sampling, in vLLM's order: bad words are banned, rows
short of `min_tokens` cannot end (their end-of-sequence and stop token ids are masked), logit
biases are added, then the repetition, frequency and presence penalties apply. All of it is
tensor operations over the rows that ask for it (`Plan`): rows without these features pay
nothing."""

from __future__ import annotations

import torch

from worker.engine.sampling import Plan
from worker.engine.slots import SlotTensors


def process(
    logits: torch.Tensor,
    slots: SlotTensors,
    plan: Plan,
    eos_ids: torch.Tensor,
    banned: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """`logits` (rows x vocab, fp32), in place; `banned`: (rows, tokens) out of the running this
    step besides the rows' one-token bad words."""
    for bans in (plan.banned, banned):
        if bans is not None:
            logits.index_put_(bans, torch.tensor(-torch.inf, device=logits.device))
    if plan.holds_eos:
        early = (slots.generated < slots.min_tokens).unsqueeze(1)
        logits[:, eos_ids] = logits[:, eos_ids].masked_fill(early, -torch.inf)
        if plan.stop_ids is not None and plan.stop_real is not None:
            held = logits.gather(1, plan.stop_ids).masked_fill(early & plan.stop_real, -torch.inf)
            logits.scatter_(1, plan.stop_ids, held)
    if plan.bias is not None:
        rows, tokens, biases = plan.bias
        logits.index_put_((rows, tokens), biases, accumulate=True)
    if plan.penalized:
        _penalize(logits, slots, plan.penalty_rows)


def _penalize(logits: torch.Tensor, slots: SlotTensors, rows: torch.Tensor | None) -> None:
    """vLLM's penalties: the repetition penalty divides the positive scores of tokens in the
    prompt or generated so far and multiplies the negative ones; the frequency penalty takes
    its value off per time a token was generated, the presence penalty once."""
    history = slots.history
    assert history is not None, "rows with penalties keep a token history"
    live = slots.rows
    counts, prompt, penalties = history.counts[:live], history.prompt[:live], slots.penalties
    scores = logits
    if rows is not None:
        counts, prompt, penalties, scores = (
            counts[rows],
            prompt[rows],
            penalties[rows],
            logits[rows],
        )
    presence, frequency, repetition = penalties.unsqueeze(2).unbind(1)
    generated = counts > 0
    factor = torch.where(prompt | generated, repetition, 1.0)
    scores = torch.where(scores > 0, scores / factor, scores * factor)
    scores = scores - frequency * counts - presence * generated
    if rows is None:
        logits.copy_(scores)
    else:
        logits[rows] = scores


def stopped(tokens: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Per row, whether its token is one of its stop token ids (bool, rows), where some row has
    them (`plan.stop_ids`)."""
    ids, real = plan.stop_ids, plan.stop_real
    assert ids is not None, "some row has stop token ids"
    assert real is not None, "stop token ids come with which are real"
    return ((tokens.unsqueeze(1) == ids) & real).any(dim=1)
