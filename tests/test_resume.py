"""A request resumed from what an earlier attempt published goes on as the uninterrupted run
would have: on the CPU in fp32 the same tokens, text and log-probabilities, on both decode
paths; its outputs carry on the text exactly after the published text."""

from __future__ import annotations

import pytest

from tests.engine_driver import Collector, Job, run
from tests.test_structured import SCHEMAS, grammar
from worker.engine import Resume, RowOutput, SamplingParams
from worker.engine.config import DecodeConfig
from worker.engine.model import LoadedModel
from worker.engine.resume import ResumeMismatch

PATHS = [
    pytest.param(DecodeConfig(static="off"), id="eager"),
    pytest.param(DecodeConfig(static="on"), id="static"),
]
PROMPT = "Once upon a time"
# Sampled and seeded, with what keeps a count of the tokens so far: penalties (over the prompt
# and the generated tokens), `min_tokens`, a stop string that is often held back, logprobs.
SAMPLED = SamplingParams(
    max_new_tokens=40,
    temperature=1.0,
    top_p=0.95,
    seed=11,
    min_tokens=30,
    stop=("zzz", " the "),
    frequency_penalty=0.4,
    presence_penalty=0.2,
    repetition_penalty=1.3,
    logprobs=2,
)


def published(outputs: list[RowOutput], events: int) -> Resume:
    """What a worker that died after `events` outputs had published."""
    sent = [out for out in outputs if out.text or out.logprobs][:events]
    return Resume(
        token_ids=[token for out in sent for token in out.ids],
        text="".join(out.text for out in sent),
        logprobs=[entry for out in sent for entry in out.logprobs or ()],
    )


def uninterrupted(lm: LoadedModel, decode: DecodeConfig, params: SamplingParams) -> Collector:
    return run(lm, [Job("full", PROMPT, params)], decode=decode)


@pytest.mark.parametrize("decode", PATHS)
def test_a_resumed_request_goes_on_as_the_uninterrupted_run(
    tiny_lm: LoadedModel, decode: DecodeConfig
) -> None:
    full = uninterrupted(tiny_lm, decode, SAMPLED)
    whole = full.done["full"]
    assert whole.finish_reason == "length"  # it ran long enough to resume from its middle
    events = len([out for out in full.outputs if out.text])
    for cut in (1, events // 2, events - 1):
        resume = published(full.outputs, cut)
        assert 0 < len(resume.token_ids) < len(whole.token_ids)
        out = run(tiny_lm, [Job("again", PROMPT, SAMPLED, resume=resume)], decode=decode)
        again = out.done["again"]
        assert again.token_ids == whole.token_ids
        assert resume.text + out.text["again"] == again.text == whole.text
        assert again.completion_tokens == whole.completion_tokens
        assert again.finish_reason == whole.finish_reason
        assert again.logprobs is not None
        assert whole.logprobs is not None
        assert [e.id for e in again.logprobs] == [e.id for e in whole.logprobs]
        # The new tokens' logprobs come from a prefill rather than decode steps: rounding only.
        for mine, theirs in zip(again.logprobs, whole.logprobs, strict=True):
            assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        # Its outputs count the earlier tokens as generated (continuous usage).
        firsts = [o for o in out.outputs if o.text]
        assert firsts[0].tokens > len(resume.token_ids)
        assert sum(len(o.ids) for o in out.outputs) == len(whole.token_ids) - len(resume.token_ids)


@pytest.mark.parametrize("decode", PATHS)
def test_a_request_resumed_from_all_its_tokens_ends_as_it_ended(
    tiny_lm: LoadedModel, decode: DecodeConfig
) -> None:
    """The earlier attempt died after its last token, before its result was written."""
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=3, stop=(" the ",))
    full = uninterrupted(tiny_lm, decode, params)
    whole = full.done["full"]
    resume = published(full.outputs, len(full.outputs))
    assert resume.token_ids == whole.token_ids
    out = run(tiny_lm, [Job("again", PROMPT, params, resume=resume)], decode=decode)
    again = out.done["again"]
    assert (again.token_ids, again.text, again.finish_reason) == (
        whole.token_ids,
        whole.text,
        whole.finish_reason,
    )
    assert out.text["again"] == ""


def test_tokens_that_do_not_give_the_published_text_fail_the_request(
    tiny_lm: LoadedModel,
) -> None:
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    full = uninterrupted(tiny_lm, DecodeConfig(static="off"), params)
    resume = published(full.outputs, 2)
    wrong = Resume(token_ids=resume.token_ids, text=resume.text + "x")
    out = run(tiny_lm, [Job("again", PROMPT, params, resume=wrong)])
    assert isinstance(out.errors["again"], ResumeMismatch)


def test_a_constrained_request_resumed_midway_follows_its_grammar_as_before(
    tiny_lm: LoadedModel,
) -> None:
    """The grammar's matcher takes the earlier tokens: the rest is masked as it would have been."""
    params = SamplingParams(
        max_new_tokens=80, temperature=0.9, seed=21, grammar=grammar(json=SCHEMAS[1])
    )
    full = uninterrupted(tiny_lm, DecodeConfig(static="off"), params)
    whole = full.done["full"]
    assert whole.finish_reason == "stop"  # its grammar ended it
    resume = published(full.outputs, len([out for out in full.outputs if out.text]) // 2)
    out = run(tiny_lm, [Job("again", PROMPT, params, resume=resume)])
    again = out.done["again"]
    assert again.token_ids == whole.token_ids
    assert resume.text + out.text["again"] == again.text == whole.text
