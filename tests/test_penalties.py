"""Penalties, logit biases, min-p and stop token ids: vLLM's rules, vectorised over the rows that
ask for them, each row's tokens a function of its own request alone."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import pytest
import torch

from tests.engine_driver import PROMPTS, Job, greedy, reference, run
from tests.sampling_harness import sample
from worker.engine.config import DecodeConfig
from worker.engine.generation import with_bad_words
from worker.engine.model import LoadedModel
from worker.engine.processors import process
from worker.engine.sampling import Planner, SamplingParams
from worker.engine.slots import SlotTensors

VOCAB = 40


def penalized_by_hand(
    logits: list[float], prompt: list[int], generated: list[int], p: SamplingParams
) -> list[float]:
    """vLLM's penalties on one row, token by token."""
    out = []
    for token, score in enumerate(logits):
        count = generated.count(token)
        if token in prompt or count:
            score = score / p.repetition_penalty if score > 0 else score * p.repetition_penalty
        score -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
        out.append(score)
    return out


def processed(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompts: list[list[int]],
    generated: list[list[int]],
) -> torch.Tensor:
    """`logits` through `process`, with each row's history as a batch would have kept it."""
    slots = SlotTensors.of(params, prompts, VOCAB, logits.device)
    for step in range(len(generated[0])):  # every row generated as many tokens
        slots.tick(torch.tensor([g[step] for g in generated]))
    planner = Planner()
    planner.add(params)
    out = logits.clone()
    process(out, slots, planner.plan(params, logits.device), torch.tensor([VOCAB - 1]), None)
    return out


def test_penalties_equal_vllms_rules_row_by_row_and_leave_other_rows_alone() -> None:
    rng = random.Random(5)
    plain = SamplingParams(max_new_tokens=50)
    params = [
        replace(plain, presence_penalty=0.7),
        plain,
        replace(plain, frequency_penalty=-0.4, repetition_penalty=1.3),
        replace(plain, repetition_penalty=0.8, presence_penalty=-1.5, frequency_penalty=2.0),
        plain,
    ]
    logits = torch.randn((len(params), VOCAB), generator=torch.Generator().manual_seed(1)) * 3
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))] for _ in params]
    generated = [[rng.randrange(VOCAB // 4) for _ in range(12)] for _ in params]
    out = processed(logits, params, prompts, generated)
    for i, p in enumerate(params):
        expected = penalized_by_hand(logits[i].tolist(), prompts[i], generated[i], p)
        assert out[i].tolist() == pytest.approx(expected, abs=1e-5), i
    assert torch.equal(out[1], logits[1])
    assert torch.equal(out[4], logits[4])


def test_logit_biases_add_to_their_rows_tokens_only() -> None:
    plain = SamplingParams(max_new_tokens=5)
    params = [replace(plain, logit_bias=((3, -100.0), (7, 2.5))), plain]
    logits = torch.zeros((2, VOCAB))
    out = processed(logits, params, [[1], [1]], [[0], [0]])
    assert out[0, 3] == -100.0
    assert out[0, 7] == 2.5
    assert out[0].count_nonzero() == 2
    assert out[1].count_nonzero() == 0


def test_a_bias_of_minus_100_keeps_greedy_decoding_off_a_token() -> None:
    logits = torch.zeros((1, VOCAB))
    logits[0, 9] = 20.0
    logits[0, 4] = 19.0
    params = SamplingParams(max_new_tokens=5, temperature=0.0, logit_bias=((9, -100.0),))
    out = processed(logits, [params], [[1]], [[0]])
    assert int(out.argmax()) == 4


def test_min_p_never_draws_a_token_below_its_share_of_the_likeliest() -> None:
    probs = torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03])
    logits = probs.log().unsqueeze(0)
    cut = SamplingParams(max_new_tokens=1, seed=3, min_p=0.2)  # keeps p >= 0.1: tokens 0-2
    drawn = {sample(logits, [cut], position)[0] for position in range(400)}
    assert drawn == {0, 1, 2}
    uncut = replace(cut, min_p=0.0)
    assert {sample(logits, [uncut], position)[0] for position in range(400)} == set(range(5))


@pytest.mark.parametrize("static", ["off", "on"])
def test_rows_with_penalties_sample_the_same_tokens_alone_and_beside_others(
    tiny_lm: LoadedModel, static: str
) -> None:
    decode = DecodeConfig(static=static)  # type: ignore[arg-type]
    sampled = SamplingParams(max_new_tokens=24, temperature=0.9, top_k=20)
    mixed = [
        Job("penalized", PROMPTS[2], replace(sampled, seed=11, presence_penalty=1.2)),
        Job("plain", PROMPTS[1], replace(sampled, seed=12)),
        Job("greedy-rep", PROMPTS[0], replace(greedy(20), repetition_penalty=1.5), at_step=3),
        Job("biased", PROMPTS[1], replace(sampled, seed=13, logit_bias=((5, 3.0),), min_p=0.05)),
        Job("freq", PROMPTS[2], replace(greedy(24), frequency_penalty=0.9), at_step=5),
    ]
    together = run(tiny_lm, mixed, decode=decode)
    assert max(together.batch_sizes) >= 3
    for job in mixed:
        alone = run(tiny_lm, [replace(job, at_step=0)], decode=decode)
        assert together.done[job.id].token_ids == alone.done[job.id].token_ids, job.id


def test_penalties_change_what_greedy_decoding_repeats(tiny_lm: LoadedModel) -> None:
    plain = reference(tiny_lm, PROMPTS[0], 40)
    assert len(set(plain)) < len(plain), "the tiny model repeats itself greedily"
    penalized = replace(greedy(40), frequency_penalty=2.0, presence_penalty=2.0)
    out = run(tiny_lm, [Job("p", PROMPTS[0], penalized)])
    tokens = out.done["p"].token_ids
    assert tokens != plain
    assert len(set(tokens)) > len(set(plain))


def test_a_stop_token_id_ends_the_row_once_min_tokens_are_out(tiny_lm: LoadedModel) -> None:
    plain = reference(tiny_lm, PROMPTS[1], 30)
    stop = plain[3]
    first = plain.index(stop)
    out = run(tiny_lm, [Job("s", PROMPTS[1], replace(greedy(30), stop_token_ids=(stop,)))])
    assert out.done["s"].token_ids == plain[: first + 1]
    assert out.done["s"].finish_reason == "stop"
    held = replace(greedy(30), stop_token_ids=(stop,), min_tokens=first + 1)
    out = run(tiny_lm, [Job("h", PROMPTS[1], held)])
    assert len(out.done["h"].token_ids) > first + 1, "a stop token is masked before min_tokens"
    assert out.done["h"].token_ids[first] != stop


def test_a_token_id_outside_the_vocabulary_fails_its_own_request(tiny_lm: LoadedModel) -> None:
    size = int(tiny_lm.model.config.vocab_size)
    jobs = [
        Job("bias", PROMPTS[0], replace(greedy(8), logit_bias=((size, 1.0),))),
        Job("stop", PROMPTS[0], replace(greedy(8), stop_token_ids=(size + 5,))),
        Job("fine", PROMPTS[1], greedy(8)),
    ]
    out = run(tiny_lm, jobs)
    assert "logit_bias names token id" in str(out.errors["bias"])
    assert "stop_token_ids names token id" in str(out.errors["stop"])
    assert out.done["fine"].token_ids == reference(tiny_lm, PROMPTS[1], 8)


def test_bad_words_are_the_words_token_sequences_alone_and_after_a_space(
    tiny_lm: LoadedModel,
) -> None:
    tokenizer = tiny_lm.tokenizer
    params = with_bad_words(tiny_lm, replace(greedy(5), bad_words=("capital", " France")))
    alone = tuple(tokenizer.encode("capital", add_special_tokens=False))
    spaced = tuple(tokenizer.encode(" capital", add_special_tokens=False))
    assert alone in params.bad_word_ids
    assert (spaced in params.bad_word_ids) == (spaced[0] != alone[0] and len(spaced) == len(alone))
    assert tuple(tokenizer.encode("France", add_special_tokens=False)) in params.bad_word_ids


@pytest.mark.parametrize("static", ["off", "on"])
def test_a_row_never_generates_its_bad_words(tiny_lm: LoadedModel, static: str) -> None:
    decode = DecodeConfig(static=static)  # type: ignore[arg-type]
    plain = reference(tiny_lm, PROMPTS[2], 30)
    pair = (plain[5], plain[6])
    single = plain[2]
    jobs = [
        Job("pair", PROMPTS[2], replace(greedy(30), bad_word_ids=(pair,))),
        Job("single", PROMPTS[2], replace(greedy(30), bad_word_ids=((single,),))),
        Job("plain", PROMPTS[2], greedy(30), at_step=2),
    ]
    out = run(tiny_lm, jobs, decode=decode)
    paired = out.done["pair"].token_ids
    assert paired[:6] == plain[:6]
    assert pair not in itertools.pairwise(paired)
    assert single not in out.done["single"].token_ids
    assert out.done["plain"].token_ids == plain


def test_a_long_bad_word_is_watched_over_all_its_tokens(tiny_lm: LoadedModel) -> None:
    plain = reference(tiny_lm, PROMPTS[1], 40)
    word = tuple(plain[5:30])  # 25 tokens: the row must remember the 24 before the last
    out = run(tiny_lm, [Job("long", PROMPTS[1], replace(greedy(40), bad_word_ids=(word,)))])
    tokens = out.done["long"].token_ids
    assert tokens[:29] == plain[:29]
    assert tokens[29] != plain[29]
