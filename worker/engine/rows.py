"""What both decode paths share of a batch: its rows, what a step gave them and why they ended,
the bookkeeping of rows in slot order, and the pick of every row's next token.

A `Row` is one request in the engine; a `Step` is what one pass gave every row; an `Ending` is a
request that ended otherwise (cancelled, timed out, failed). The eager batch (`eager/batch.py`)
and the static one (`static/batch.py`) both keep their rows in a `RowBook`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from llguidance import LLMatcher

from common.jobs import FinishReason, TokenLogprob
from worker.engine.compaction import compaction
from worker.engine.generation import Generation, GenerationError
from worker.engine.grammar import Masks
from worker.engine.logprobs import TokenScores, TokenTexts, gather, log_softmax, score_prompt
from worker.engine.model import LoadedModel
from worker.engine.processors import process, stopped
from worker.engine.sampling import Plan, Planner, SamplingParams, next_tokens
from worker.engine.slots import SlotTensors
from worker.engine.textstream import TextStream

# Why a row ended in a step (`Step.codes`), as flags; a failed row's token means nothing; a row
# whose grammar is COMPLETE ends with its token, whose text counts (an end-of-sequence's does not).
LENGTH, EOS, FAILED, COMPLETE = 1, 2, 4, 8


@dataclass(eq=False)
class Row:
    """One sequence. The engine thread owns its scheduling fields; the text side (the
    detokenizer thread) owns the rest: its stream, its tokens and whether it was answered."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: TextStream
    # What its prefill feeds: its prompt, then, for a request resumed after an earlier attempt
    # died (`resume.py`), the tokens that attempt published, which count as generated.
    prefill_ids: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    cached_prompt_tokens: int = 0
    cache_scope: str = ""  # the prefix-cache partition of its prompt (an API key)
    echo: bool = False  # its generation holds its prompt's text
    queued_step: int = 0  # the engine step at which it began waiting
    # The batch pass that prefilled it, and the cache columns it spanned after that pass.
    first_pass: int = 0
    first_span: int = 0
    # Its last generated tokens, kept while it has bad words of several tokens to watch for.
    recent: list[int] = field(default_factory=list)
    # Its prompt tokens' log-probabilities, when it asks for them (set before its prefill).
    prompt_logprobs: list[TokenScores | None] | None = None
    # Where it follows a grammar: the matcher of its tokens so far (the engine thread's).
    matcher: LLMatcher | None = None
    # The text side's: its tokens, and those tokens' log-probabilities when it asks for them,
    # all and those not yet handed on with text.
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    sent: int = 0  # of token_ids, those handed on with an output
    first_token_s: float | None = None
    answered: bool = False

    @property
    def resumed_ids(self) -> list[int]:
        """The tokens an earlier attempt generated, which this row goes on from."""
        return self.prefill_ids[len(self.prompt_ids) :]

    @property
    def budget(self) -> int:
        """The tokens it may still generate."""
        return self.params.max_new_tokens - (len(self.prefill_ids) - len(self.prompt_ids))

    @property
    def reserved_tokens(self) -> int:
        """KV-cache tokens this row may grow to, alone."""
        return len(self.prefill_ids) + self.budget

    @property
    def origin(self) -> int:
        """Its cache span at batch pass count P is `origin + P`."""
        return self.first_span - self.first_pass

    def take_unsent_logprobs(self) -> list[TokenLogprob]:
        unsent, self.unsent_logprobs = self.unsent_logprobs, []
        return unsent

    def take_unsent_ids(self) -> list[int]:
        """Its tokens since its last output, for the next: that output's text comes from them
        (and from earlier tokens whose text was held back)."""
        unsent = self.token_ids[self.sent :]
        self.sent = len(self.token_ids)
        return unsent

    def generation(self, reason: FinishReason, texts: TokenTexts) -> Generation:
        generation_s = time.perf_counter() - self.started
        first = self.first_token_s
        prompt_logprobs = None
        if self.prompt_logprobs is not None:
            prompt_logprobs = [
                texts.entry(scores) if scores else texts.unscored(token)
                for token, scores in zip(self.prompt_ids, self.prompt_logprobs, strict=True)
            ]
        return Generation(
            text=self.stream.text,
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
            # A resumed row's cached prefix may reach into its earlier tokens.
            cached_prompt_tokens=min(self.cached_prompt_tokens, len(self.prompt_ids)),
            token_ids=self.token_ids,
            prompt_ids=self.prompt_ids,
            logprobs=self.logprobs if self.params.logprobs is not None else None,
            prompt_logprobs=prompt_logprobs,
            prompt_text=texts.decode(self.prompt_ids) if self.echo else None,
            time_to_first_token_s=first,
            generation_s=generation_s,
            prefill_s=first,
            decode_s=None if first is None else generation_s - first,
        )


def new_row(
    lm: LoadedModel,
    request_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
    cache_scope: str = "",
    *,
    echo: bool = False,
) -> Row:
    return Row(
        request_id=request_id,
        prompt_ids=prompt_ids,
        prefill_ids=prompt_ids,
        params=params,
        stream=TextStream(lm.tokenizer, prompt_ids, list(params.stop), params.min_tokens),
        cache_scope=cache_scope,
        echo=echo,
    )


def score(lm: LoadedModel, rows: list[Row]) -> None:
    """The prompt log-probabilities of the rows that ask for them."""
    for row in rows:
        top = row.params.prompt_logprobs
        if top is not None and row.prompt_logprobs is None:
            row.prompt_logprobs = score_prompt(lm.model, row.prompt_ids, top)


@dataclass(frozen=True, slots=True)
class Step:
    """What one pass gave every row, in slot order: its token and why it ended (0: it runs on;
    else LENGTH, EOS, FAILED or COMPLETE flags); where rows report log-probabilities, each
    row's (None for the rows that do not)."""

    rows: tuple[Row, ...]
    tokens: list[int]
    codes: list[int]
    logprobs: list[TokenScores | None] | None = None


@dataclass(frozen=True, slots=True)
class Ending:
    """A request that ended other than by its tokens: `row` is None for one that never became a
    row (its prompt was refused); `reason` for a finish, `error` for a failure."""

    request_id: str
    row: Row | None
    reason: FinishReason | None = None
    error: GenerationError | None = None


class RowBook:
    """What both kinds of batch keep of their rows, in slot order: the rows, the forward passes
    taken, the widest origin among them, and their sampling plan (worked out again when the rows
    change)."""

    def __init__(self, rows: list[Row], device: torch.device) -> None:
        self.rows = rows
        self.passes = 0  # forward passes this batch has taken
        self._device = device
        self._widest = max(row.origin for row in rows)
        self.planner = Planner()
        self.planner.add(row.params for row in rows)
        self._plan: Plan | None = None  # of the rows as they are; None: to work out
        self.masks = Masks()  # the constrained rows' next masks

    def __len__(self) -> int:
        return len(self.rows)

    def _take_rows(self, other: RowBook) -> None:
        """Count in `other`'s rows, prefilled by the same pass, after these."""
        shift = self.passes - other.passes
        for row in other.rows:
            row.first_pass += shift
        self._widest = max(self._widest, max(row.origin for row in other.rows))  # shifted
        self.planner.add(row.params for row in other.rows)
        self._plan = None
        self.rows += other.rows

    def _drop_rows(self, dropped: list[int]) -> list[tuple[int, int]]:
        """Drop the rows at indexes `dropped`: each hole below the new size takes a row from
        the end. The moves (slot, from slot) the batch's tensors make too."""
        rows = self.rows
        gone = [rows[i] for i in dropped]
        moves = compaction(len(rows), dropped)
        for slot, source in moves:
            rows[slot] = rows[source]
        del rows[len(rows) - len(dropped) :]
        self.planner.add((row.params for row in gone), -1)
        self._plan = None
        if max(row.origin for row in gone) >= self._widest:
            self._widest = max(row.origin for row in rows)
        return moves

    def _sampling_plan(self) -> Plan:
        if self._plan is None:
            self._plan = self.planner.plan([row.params for row in self.rows], self._device)
        return self._plan

    def _pick(
        self, logits: torch.Tensor, slots: SlotTensors, eos_ids: torch.Tensor
    ) -> tuple[torch.Tensor, Step]:
        """Every row's token, on the device, and the step as the host sees it: the tokens and
        end codes come over in one transfer."""
        plan = self._sampling_plan()
        banned = self._bad_word_ends() if plan.watches_sequences else None
        # Before the grammars and the processors change the logits in place.
        scores = log_softmax(self._reporting(logits, plan)) if plan.logprobs else None
        if plan.constrained:
            constrained, allowed = self.masks.take(self.rows, logits)
            logits[constrained] = logits[constrained].masked_fill(~allowed, -torch.inf)
        tokens, codes = pick_tokens(logits, slots, plan, eos_ids, banned)
        host: list[list[int]] = torch.stack((tokens, codes)).tolist()
        if plan.watches_sequences:
            for row, token in zip(self.rows, host[0], strict=True):
                if watched := row.params.watched_tokens:
                    row.recent = [*row.recent, token][-watched:]
        if plan.constrained:
            self._follow_grammars(host[0], host[1], logits.shape[1])
        logprobs = None
        if scores is not None:
            reported = gather(scores, self._reporting(tokens, plan), plan.top_logprobs)
            logprobs = self._row_logprobs(reported)
        return tokens, Step(tuple(self.rows), host[0], host[1], logprobs)

    def _follow_grammars(self, tokens: list[int], codes: list[int], vocab: int) -> None:
        """Each constrained row's matcher takes its token: a row whose grammar has ended ends
        (as at end-of-sequence); the masks of the others' next tokens start at once."""
        going = []
        for i, (row, token) in enumerate(zip(self.rows, tokens, strict=True)):
            matcher = row.matcher
            if matcher is None or codes[i] & FAILED:
                continue
            if not matcher.consume_token(token):
                codes[i] |= FAILED
            elif matcher.is_stopped():
                codes[i] |= COMPLETE
            elif not codes[i]:
                going.append(row)
        self.masks.ahead(going, vocab)

    @staticmethod
    def _reporting(values: torch.Tensor, plan: Plan) -> torch.Tensor:
        """The rows of `values` that report log-probabilities."""
        return values if plan.logprob_rows is None else values[plan.logprob_rows]

    def _row_logprobs(self, reported: list[TokenScores]) -> list[TokenScores | None]:
        """`reported` (of the reporting rows, in order) as every row's, trimmed to the top
        tokens each row asks for."""
        entries = iter(reported)
        out: list[TokenScores | None] = []
        for row in self.rows:
            top = row.params.logprobs
            if top is None:
                out.append(None)
                continue
            entry = next(entries)
            out.append(entry if len(entry.top) == top else replace(entry, top=entry.top[:top]))
        return out

    def _bad_word_ends(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, tokens) this step may not pick: the last token of each bad word whose other
        tokens the row generated last."""
        pairs = [
            (i, ids[-1])
            for i, row in enumerate(self.rows)
            for ids in row.params.bad_word_ids
            if len(ids) > 1 and tuple(row.recent[len(row.recent) - len(ids) + 1 :]) == ids[:-1]
        ]
        if not pairs:
            return None
        rows, tokens = zip(*pairs, strict=True)
        return torch.tensor(rows, device=self._device), torch.tensor(tokens, device=self._device)


def pick_tokens(
    logits: torch.Tensor,
    slots: SlotTensors,
    plan: Plan,
    eos_ids: torch.Tensor,
    banned: tuple[torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's next token from `logits` (rows x vocab, fp32), and its end codes; `banned`:
    (rows, tokens) also out of the running this step."""
    process(logits, slots, plan, eos_ids, banned)
    tokens, usable = next_tokens(
        logits,
        slots.temperature,
        slots.top_k,
        slots.top_p,
        slots.keys,
        slots.generated,
        plan,
        slots.min_p,
    )
    ends = torch.isin(tokens, eos_ids) * slots.eos_ends
    if plan.stop_ids is not None:
        # A stop token id ends a row as end-of-sequence does, `ignore_eos` or not (vLLM).
        ends = ends | stopped(tokens, plan)
    codes = (slots.generated >= slots.last) * LENGTH + ends * EOS + (~usable) * FAILED
    return tokens, codes
