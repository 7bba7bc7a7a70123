"""Next-token choice for a whole batch in one pass: greedy and sampled rows together, with
temperature, top-k and top-p as per-row tensors.

A sampled row draws its n-th token with the n-th number of its own random stream: SplitMix64
seeded with its (mixed) seed, computed from (seed, n) by a few integer tensor operations. So a
seeded request samples the same tokens alone or in any batch, and a re-run of it reproduces the
tokens already streamed, without a generator per row or a call per row; the pass is a fixed
sequence of tensor operations, as CUDA graphs need. The number picks a token by inverting the
cumulative distribution in vocabulary order, after top-k and top-p have zeroed what they cut:
whichever way the batch computes those cuts, the same distribution gives the same token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

# Dividing logits by a tinier temperature overflows them; in the limit it is greedy anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5
_MAX_SCORE = torch.finfo(torch.float32).max

_MASK64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks), stop strings aside
    min_tokens: int = 0  # tokens before end-of-sequence, a stop token or string may end it
    # vLLM's meanings: presence and frequency penalties over the generated tokens, the
    # multiplicative repetition penalty over the prompt's and the generated ones (1: off),
    # min-p (0: off), biases added to token ids' logits, and token ids that end the row.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # Words never generated (vLLM's `bad_words`), and the token sequences they are, which the
    # engine works out with the model's tokenizer at intake (`generation.with_bad_words`).
    bad_words: tuple[str, ...] = ()
    bad_word_ids: tuple[tuple[int, ...], ...] = ()
    # Log-probabilities reported (vLLM's meanings): None: none; k: each generated (or prompt)
    # token's, with the k likeliest tokens at its position.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Structured output: the llguidance grammar its tokens must follow (`grammar.py`).
    grammar: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def top_k_cut(self) -> int:
        """The top-k this row samples with; 0: none (greedy rows sample nothing)."""
        return 0 if self.greedy else self.top_k

    @property
    def top_p_cut(self) -> bool:
        return not self.greedy and self.top_p < 1.0

    @property
    def ranks_all(self) -> bool:
        """Top-p without top-k: the row's whole vocabulary is ranked."""
        return self.top_p_cut and not self.top_k_cut

    @property
    def penalized(self) -> bool:
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )

    @property
    def min_p_cut(self) -> bool:
        return not self.greedy and self.min_p > 0.0

    @property
    def banned_tokens(self) -> list[int]:
        """Its one-token bad words: never picked."""
        return [ids[0] for ids in self.bad_word_ids if len(ids) == 1]

    @property
    def watched_tokens(self) -> int:
        """How many of its last generated tokens a step checks against its bad words of several
        tokens (all but their last); 0: it has none."""
        return max((len(ids) - 1 for ids in self.bad_word_ids), default=0)

    @property
    def watches_sequences(self) -> bool:
        return self.watched_tokens > 0


@dataclass(frozen=True, slots=True)
class Plan:
    """What the batch's rows ask of a pass, known on the host: which tensor work to skip."""

    sampled: bool = False  # some row samples
    # The rows that sample (the others are greedy), when not all do: only they pay for the
    # sampling pass, a few passes over their vocabulary.
    rows: torch.Tensor | None = None
    top_k: int = 0  # the largest top-k of the rows; 0: no row cuts by top-k
    top_p: bool = False  # some row cuts by top-p
    # Of the sampling rows, those that cut by top-p without top-k, whose whole vocabulary is
    # ranked (a full sort costs about 3 ms a row for a 49k vocabulary on a CPU core).
    rank_all: torch.Tensor | None = None
    # Some row may not end yet (`min_tokens`): its end-of-sequence scores are masked.
    holds_eos: bool = False
    min_p: bool = False  # some sampling row cuts by min-p
    # The rows with penalties (all rows: None, when `penalized`).
    penalized: bool = False
    penalty_rows: torch.Tensor | None = None
    # Every row's logit biases as (rows, token ids, biases), flat.
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # Every row's one-token bad words as (rows, token ids), flat; whether some row has longer
    # ones, banned step by step.
    banned: tuple[torch.Tensor, torch.Tensor] | None = None
    watches_sequences: bool = False
    # Every row's stop token ids (rows x the most any row has), padded with the row's own first
    # id (or 0 without any), and which are real.
    stop_ids: torch.Tensor | None = None
    stop_real: torch.Tensor | None = None
    # Some row reports its tokens' log-probabilities: those rows (all rows: None), and the most
    # top tokens any of them asks for.
    logprobs: bool = False
    logprob_rows: torch.Tensor | None = None
    top_logprobs: int = 0
    constrained: bool = False  # some row follows a grammar


class Planner:
    """Keeps count of what a batch's rows ask of sampling, as rows come and go (O(rows that
    change)), for the `Plan` of each pass."""

    def __init__(self) -> None:
        self._sampled = self._top_p = self._rank_all = self._min_tokens = self._min_p = 0
        self._penalized = self._biased = self._stop_ids = self._banned = self._watching = 0
        self._top_k: Counter[int] = Counter()
        self._top_logprobs: Counter[int] = Counter()  # rows with logprobs, by top tokens asked
        self._constrained = 0

    def add(self, params: Iterable[SamplingParams], sign: int = 1) -> None:
        """Count rows in (`sign` 1) or out (-1)."""
        for p in params:
            self._min_tokens += sign * (p.min_tokens > 0)
            self._penalized += sign * p.penalized
            self._biased += sign * bool(p.logit_bias)
            self._stop_ids += sign * bool(p.stop_token_ids)
            self._banned += sign * bool(p.banned_tokens)
            self._watching += sign * p.watches_sequences
            self._constrained += sign * (p.grammar is not None)
            if p.logprobs is not None:
                self._top_logprobs[p.logprobs] += sign
                if not self._top_logprobs[p.logprobs]:
                    del self._top_logprobs[p.logprobs]
            if p.greedy:
                continue
            self._sampled += sign
            self._min_p += sign * p.min_p_cut
            if p.top_k_cut:
                self._top_k[p.top_k_cut] += sign
                if not self._top_k[p.top_k_cut]:
                    del self._top_k[p.top_k_cut]
            if p.top_p_cut:
                self._top_p += sign
                self._rank_all += sign * p.ranks_all

    def plan(self, params: Sequence[SamplingParams], device: torch.device) -> Plan:
        """The plan of a pass over rows of `params` (in slot order, the rows counted in)."""
        plan = Plan(holds_eos=self._min_tokens > 0, **self._processors(params, device))
        if not self._sampled:
            return plan
        rows = rank_all = None
        sampling = [i for i, p in enumerate(params) if not p.greedy]
        if len(sampling) < len(params):
            rows = torch.tensor(sampling, device=device)
        if self._rank_all:
            ranking = [j for j, i in enumerate(sampling) if params[i].ranks_all]
            rank_all = torch.tensor(ranking, device=device)
        return replace(
            plan,
            sampled=True,
            rows=rows,
            top_k=max(self._top_k, default=0),
            top_p=self._top_p > 0,
            rank_all=rank_all,
            min_p=self._min_p > 0,
        )

    def _processors(self, params: Sequence[SamplingParams], device: torch.device) -> dict[str, Any]:
        """The plan's fields for penalties, biases and stop token ids: tensors built once for
        as long as the rows stay the same."""
        fields: dict[str, Any] = {}
        if self._penalized:
            fields["penalized"] = True
            if self._penalized < len(params):
                penalized = [i for i, p in enumerate(params) if p.penalized]
                fields["penalty_rows"] = torch.tensor(penalized, device=device)
        if self._biased:
            flat = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias]
            rows, tokens, biases = zip(*flat, strict=True)
            fields["bias"] = (
                torch.tensor(rows, device=device),
                torch.tensor(tokens, device=device),
                torch.tensor(biases, dtype=torch.float32, device=device),
            )
        if self._banned:
            bans = [(i, t) for i, p in enumerate(params) for t in p.banned_tokens]
            banned_rows, banned_tokens = zip(*bans, strict=True)
            fields["banned"] = (
                torch.tensor(banned_rows, device=device),
                torch.tensor(banned_tokens, device=device),
            )
        fields["watches_sequences"] = self._watching > 0
        fields["constrained"] = self._constrained > 0
        if self._top_logprobs:
            fields["logprobs"] = True
            fields["top_logprobs"] = max(self._top_logprobs)
            if self._top_logprobs.total() < len(params):
                reporting = [i for i, p in enumerate(params) if p.logprobs is not None]
                fields["logprob_rows"] = torch.tensor(reporting, device=device)
        if self._stop_ids:
            width = max(len(p.stop_token_ids) for p in params)
            ids = [list(p.stop_token_ids) or [0] for p in params]
            fields["stop_ids"] = torch.tensor(
                [row + [row[0]] * (width - len(row)) for row in ids], device=device
            )
            fields["stop_real"] = torch.tensor(
                [[j < len(p.stop_token_ids) for j in range(width)] for p in params], device=device
            )
        return fields


def sanitize(logits: torch.Tensor) -> torch.Tensor:
    """fp32 logits with NaN turned into -inf (never chosen) and +inf into the largest float, in
    place, so argmax and softmax see only what they can rank; a row left with no finite logit
    cannot be sampled at all."""
    return logits.nan_to_num_(nan=-torch.inf, posinf=_MAX_SCORE, neginf=-torch.inf)


def stream_key(seed: int) -> int:
    """The seed of a row's stream (an int64): `seed` through SplitMix64's finaliser, so that
    nearby seeds give unrelated streams."""
    key = _finalise((seed + _GOLDEN) & _MASK64)
    return key - 2**64 if key >= 2**63 else key


def uniform(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per row, the number in [0, 1) (float32, 24 random bits) of its stream at `positions`:
    the top bits of output `positions` of SplitMix64 seeded with `keys` (int64 tensors; the
    arithmetic wraps around as in uint64, shifts are made logical with masks)."""
    z = keys + (positions + 1) * _signed(_GOLDEN)
    z = (z ^ ((z >> 30) & (2**34 - 1))) * _signed(_MIX1)
    z = (z ^ ((z >> 27) & (2**37 - 1))) * _signed(_MIX2)
    z = z ^ ((z >> 31) & (2**33 - 1))
    return ((z >> 40) & (2**24 - 1)).float() * 2.0**-24


def reference_uniform(key: int, position: int) -> float:
    """`uniform` in plain Python integers, for one row."""
    z = _finalise((key + (position + 1) * _GOLDEN) & _MASK64)
    return (z >> 40) * 2.0**-24


def _finalise(z: int) -> int:
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _signed(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


def next_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    plan: Plan,
    min_p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's next token and whether its scores could be sampled at all (B, each).

    `logits` (B x vocab, fp32) is sanitised in place. Per row: `temperature` (float; below
    GREEDY_BELOW_TEMPERATURE the row is greedy), `top_k` (int; 0: off), `top_p` (float; 1: off),
    `keys` (`stream_key` of its seed), `positions` (the index of the token drawn) and `min_p`
    (float; 0: off).
    """
    logits = sanitize(logits)
    best = logits.argmax(dim=-1)
    top = logits.gather(1, best.unsqueeze(1))
    usable = top.squeeze(1) > -torch.inf
    if not plan.sampled:
        return best, usable
    cut = min_p if plan.min_p else None
    if plan.rows is None:
        picked = _draw(logits, top, best, temperature, top_k, top_p, keys, positions, plan, cut)
        return picked, usable
    rows = plan.rows
    picked = _draw(
        logits[rows], top[rows], best[rows], temperature[rows], top_k[rows], top_p[rows],
        keys[rows], positions[rows], plan, None if cut is None else cut[rows],
    )  # fmt: skip
    return best.index_put((rows,), picked), usable


def _draw(
    logits: torch.Tensor,
    top: torch.Tensor,
    best: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    plan: Plan,
    min_p: torch.Tensor | None,
) -> torch.Tensor:
    """The sampling rows' tokens (`logits`: theirs, sanitised, overwritten; `top` and `best`:
    their best scores and tokens)."""
    # Shifted so that the best score is 0 whatever the temperature: the softmax always has a
    # finite maximum. A row with no finite score (it fails) gets zeros, never NaN.
    usable = top > -torch.inf
    scale = temperature.clamp(min=GREEDY_BELOW_TEMPERATURE).unsqueeze(1)
    scores = logits.sub_(top.where(usable, 0.0)).div_(scale).masked_fill_(~usable, 0.0)
    probs = torch.softmax(scores, dim=-1)
    if min_p is not None:
        # Before top-k and top-p, as vLLM cuts: tokens less likely than min_p x the best.
        floor = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
        probs = torch.where(probs >= floor, probs, 0.0)
    if plan.top_k or plan.rank_all is not None:
        probs = torch.where(probs >= _threshold(probs, top_k, top_p, plan), probs, 0.0)
    cdf = probs.cumsum(dim=-1)
    target = uniform(keys, positions).unsqueeze(1) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, target, right=True).clamp(max=probs.shape[1] - 1)
    # Rounding can put the target at the very end of the distribution, past its last token.
    return torch.where(probs.gather(1, picked) > 0, picked, best.unsqueeze(1)).squeeze(1)


def _threshold(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, plan: Plan
) -> torch.Tensor:
    """Per row (B x 1), the smallest probability top-k and then top-p keep (as transformers'
    warpers do: top-p applies to what top-k left; ties with the last kept token stay)."""
    threshold = probs.new_zeros((probs.shape[0], 1))
    if plan.top_k:
        ranked = probs.topk(min(plan.top_k, probs.shape[1]), dim=-1).values
        kth = ranked.gather(1, (top_k.clamp(min=1, max=ranked.shape[1]) - 1).unsqueeze(1))
        threshold = torch.where(top_k.unsqueeze(1) > 0, kth, 0.0)
        if plan.top_p:
            # Wrong for the rows in `rank_all`, whose nucleus may reach past this ranking:
            # they get theirs below.
            threshold = _nucleus(ranked, threshold, top_p)
    if plan.rank_all is not None:
        rows = plan.rank_all
        ranked = probs[rows].sort(dim=-1, descending=True).values
        no_top_k = ranked.new_zeros((ranked.shape[0], 1))
        threshold[rows] = _nucleus(ranked, no_top_k, top_p[rows])
    return threshold


def _nucleus(ranked: torch.Tensor, threshold: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`threshold` raised, in rows that cut by top-p, to the smallest probability of their
    nucleus: the most likely tokens above `threshold` (`ranked`: probabilities sorted down)
    until they reach top_p of what is left, the token that crosses it included."""
    kept = torch.where(ranked >= threshold, ranked, 0.0)
    cdf = kept.cumsum(dim=-1)
    inside = (cdf - kept) < top_p.unsqueeze(1) * cdf[:, -1:]  # a prefix of the ranking
    last = inside.sum(dim=-1, keepdim=True).clamp(min=1) - 1
    nucleus = kept.gather(1, last)
    return torch.where(top_p.unsqueeze(1) < 1.0, torch.maximum(threshold, nucleus), threshold)
