"""Log-probabilities from the engine: the raw log-softmax of the model's logits for generated and
prompt tokens, on both decode paths, each row's a function of its own request alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from gateway.schemas import GenerationRequest
from tests.engine_driver import PROMPTS, Job, greedy, reference, run
from worker.engine.config import DecodeConfig
from worker.engine.generation import Generation, build_prompt_ids
from worker.engine.logprobs import TokenTexts
from worker.engine.model import LoadedModel
from worker.engine.sampling import SamplingParams

PATHS = {"eager": DecodeConfig(static="off"), "static": DecodeConfig(static="on")}


def reference_logprobs(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's own forward pass over `ids`: row i scores token i + 1."""
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def check_generated(lm: LoadedModel, prompt: str, done: Generation, top: int) -> None:
    """Every generated token's logprob and its top tokens equal the reference's at its place."""
    prompt_ids = build_prompt_ids(lm, GenerationRequest(prompt=prompt))
    expected = reference_logprobs(lm, prompt_ids + done.token_ids)
    assert done.logprobs is not None
    assert [entry.id for entry in done.logprobs] == done.token_ids
    for i, entry in enumerate(done.logprobs):
        row = expected[len(prompt_ids) - 1 + i]
        assert entry.logprob == pytest.approx(row[entry.id].item(), abs=1e-4)
        assert len(entry.top_logprobs) == top
        best = row.topk(top)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            best.values.tolist(), abs=1e-4
        )
        if top:
            assert entry.top_logprobs[0].id == best.indices[0].item()


@pytest.mark.parametrize("path", PATHS)
def test_generated_logprobs_are_the_models_log_softmax_whatever_the_row_samples_with(
    tiny_lm: LoadedModel, path: str
) -> None:
    plain = greedy(6)
    jobs = [
        Job("top5", PROMPTS[1], replace(plain, logprobs=5)),
        Job("top0", PROMPTS[2], replace(plain, logprobs=0), at_step=2),
        # Penalties, a bias and temperature change what is sampled, not what is reported.
        Job(
            "sampled",
            PROMPTS[0],
            replace(
                plain,
                temperature=0.8,
                seed=3,
                presence_penalty=1.5,
                repetition_penalty=1.3,
                logit_bias=((7, 5.0),),
                logprobs=2,
            ),
        ),
        Job("none", PROMPTS[0], plain),
    ]
    out = run(tiny_lm, jobs, decode=PATHS[path])
    check_generated(tiny_lm, PROMPTS[1], out.done["top5"], 5)
    check_generated(tiny_lm, PROMPTS[2], out.done["top0"], 0)
    check_generated(tiny_lm, PROMPTS[0], out.done["sampled"], 2)
    assert out.done["none"].logprobs is None


def test_a_row_reports_the_same_logprobs_alone_as_in_a_batch(tiny_lm: LoadedModel) -> None:
    params = replace(greedy(5), temperature=0.9, seed=11, logprobs=3)
    alone = run(tiny_lm, [Job("a", PROMPTS[2], params)]).done["a"]
    crowd = [Job(f"b{i}", PROMPTS[i % 3], replace(params, seed=i)) for i in range(5)]
    batched = run(tiny_lm, [*crowd, Job("a", PROMPTS[2], params, at_step=1)]).done["a"]
    assert batched.token_ids == alone.token_ids
    assert alone.logprobs is not None
    assert batched.logprobs is not None
    for mine, theirs in zip(alone.logprobs, batched.logprobs, strict=True):
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert [t.id for t in mine.top_logprobs] == [t.id for t in theirs.top_logprobs]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("max_new_tokens", [0, 3])
def test_prompt_logprobs_score_each_prompt_token_given_those_before_it(
    tiny_lm: LoadedModel, max_new_tokens: int, path: str
) -> None:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, prompt_logprobs=2)
    # Beside a running row: the scoring pass leaves the batch's cache alone.
    neighbour = Job("n", PROMPTS[0], greedy(6))
    out = run(tiny_lm, [neighbour, Job("p", PROMPTS[2], params, at_step=2)], decode=PATHS[path])
    assert out.done["n"].token_ids == reference(tiny_lm, PROMPTS[0], 6)
    done = out.done["p"]
    ids = build_prompt_ids(tiny_lm, GenerationRequest(prompt=PROMPTS[2]))
    assert len(done.token_ids) == max_new_tokens
    assert done.prompt_logprobs is not None
    first = done.prompt_logprobs[0]
    assert (first.id, first.logprob, first.top_logprobs) == (ids[0], None, [])
    expected = reference_logprobs(tiny_lm, ids)
    for i, entry in enumerate(done.prompt_logprobs[1:]):
        assert entry.id == ids[i + 1]
        assert entry.logprob == pytest.approx(expected[i, ids[i + 1]].item(), abs=1e-4)
        assert len(entry.top_logprobs) == 2
    assert done.finish_reason == "length"


def test_token_texts_give_each_tokens_exact_bytes(tiny_lm: LoadedModel) -> None:
    texts = TokenTexts(tiny_lm.tokenizer)
    ids = tiny_lm.tokenizer("héllo wörld ✓", add_special_tokens=False).input_ids
    spelled = b""
    for token in ids:
        text, raw = texts.of(token)
        spelled += bytes(raw) if raw is not None else text.encode()
    assert spelled.decode() == "héllo wörld ✓"
