"""A request that goes on from what an earlier attempt of it published, rather than from its
prompt: the job's worker died mid-generation, and its client already holds part of the text.

The earlier tokens join the prompt in the row's prefill (its KV cache) but count as generated:
the sampler's counter, `max_new_tokens`, `min_tokens` and the penalties go on where they were
(`SlotTensors.of`), the grammar's matcher and the bad words' watch take them, and the row's
text stream decodes them again, so that its next text follows the published text exactly. The
stream then equals the result by construction: nothing published is generated again, on any
hardware, whether or not a re-run would have sampled the same tokens.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from common.jobs import FinishReason, TokenLogprob
from worker.engine.generation import GenerationError
from worker.engine.rows import Row


@dataclass(frozen=True, slots=True)
class Resume:
    """What earlier attempts of a request published: their tokens, the text those gave, and
    the tokens' log-probabilities where the request asks for them."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


class ResumeMismatch(GenerationError):
    """The published tokens do not give the published text: the stream cannot go on."""


def resume_row(row: Row, resume: Resume, eos_ids: Collection[int]) -> FinishReason | None:
    """Set `row` up to go on after `resume`'s tokens. Returns how the request ended, where those
    tokens already end it (the earlier attempt died after its last token, before its result)."""
    ids = resume.token_ids
    params = row.params
    if len(ids) > params.max_new_tokens:
        raise ResumeMismatch(
            f"an earlier attempt published {len(ids)} tokens, past max_new_tokens "
            f"({params.max_new_tokens})"
        )
    row.prefill_ids = [*row.prompt_ids, *ids]
    row.token_ids = list(ids)
    row.sent = len(ids)
    if params.logprobs is not None:
        row.logprobs = list(resume.logprobs)
    if watched := params.watched_tokens:
        row.recent = ids[-watched:]
    # As the text side ends a row on its last token (`Detokenizer._last_token`): an
    # end-of-sequence or stop token id adds no text.
    last = ids[-1] if ids else None
    by_token = last is not None and (
        last in params.stop_token_ids or (not params.ignore_eos and last in eos_ids)
    )
    complete = _follow_grammar(row, ids)
    text = "".join(row.stream.push(token) for token in (ids[:-1] if by_token else ids))
    reason: FinishReason | None = None
    if by_token or complete or row.stream.stopped:
        reason = "stop"
    elif len(ids) == params.max_new_tokens:
        reason = "length"
    if reason is not None:
        text += row.stream.flush()
    if text != resume.text:
        raise ResumeMismatch(
            f"the {len(ids)} tokens an earlier attempt published do not decode to the text it "
            "published: it cannot be continued"
        )
    return reason


def _follow_grammar(row: Row, ids: list[int]) -> bool:
    """The row's matcher takes the earlier tokens; whether its grammar has ended."""
    matcher = row.matcher
    if matcher is None:
        return False
    for token in ids:
        if not matcher.consume_token(token):
            raise ResumeMismatch("the tokens an earlier attempt published break its grammar")
    return bool(matcher.is_stopped())
