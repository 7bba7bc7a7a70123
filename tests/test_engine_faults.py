"""Faults stay with their row: a row the model, the sampler, the chat template or the
detokenizer cannot serve fails alone; a step that fails as a whole fails its rows, and the
engine goes on or, after a device error or faults in a row, gives up and says so."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from common.settings import Settings
from gateway.schemas import GenerationRequest
from tests.engine_driver import PROMPTS, Collector, Job, greedy, reference, run
from tests.sampling_harness import sample
from tests.tiny_model import CHAT_TEMPLATE
from worker.engine import Engine, EngineHealth, EngineLimits, EngineRequest, RowOutput, textstream
from worker.engine.eager.batch import Batch, forward_all
from worker.engine.generation import build_prompt_ids
from worker.engine.model import LoadedModel
from worker.engine.rows import FAILED, new_row
from worker.engine.sampling import SamplingParams
from worker.loading import load_model

POISONED_PROMPT = "emoji 🎉 and 日本語"


@pytest.fixture
def own_lm(tiny_model_dir: Path) -> LoadedModel:
    """The tiny model, loaded for this test alone: the test may break it."""
    return load_model(Settings(model=str(tiny_model_dir), device="cpu"))


def ids_of(lm: LoadedModel, prompt: str) -> list[int]:
    return build_prompt_ids(lm, GenerationRequest(prompt=prompt))


def alone(lm: LoadedModel, job: Job) -> list[int]:
    return run(lm, [Job(job.id, job.prompt, job.params, chat=job.chat)]).done[job.id].token_ids


def test_a_row_whose_scores_are_nan_fails_alone(own_lm: LoadedModel) -> None:
    # A token of the poisoned prompt that no other prompt has gets a NaN embedding: every
    # activation of that row is NaN, so are its logits.
    others = {token for prompt in PROMPTS for token in ids_of(own_lm, prompt)}
    token = next(t for t in ids_of(own_lm, POISONED_PROMPT) if t not in others)
    assert token != own_lm.tokenizer.pad_token_id  # padding must stay finite
    with torch.no_grad():
        own_lm.model.model.embed_tokens.weight[token] = float("nan")
    sampled = SamplingParams(max_new_tokens=25, temperature=0.8, top_p=0.9, seed=3)
    jobs = [
        Job("a", PROMPTS[0], greedy(25)),
        Job("b", PROMPTS[1], sampled),
        # Admitted while a and b run, in one prefill batch with c.
        Job("poisoned", POISONED_PROMPT, greedy(25), at_step=3),
        Job("c", PROMPTS[2], greedy(25), at_step=3),
        Job("poisoned-sampled", POISONED_PROMPT, sampled, at_step=5),
    ]
    out = run(own_lm, jobs)
    for poisoned in ("poisoned", "poisoned-sampled"):
        assert out.errors[poisoned].code == "numerical_error"
        assert "NaN" in str(out.errors[poisoned])
    for job in jobs:
        if not job.id.startswith("poisoned"):
            assert out.done[job.id].token_ids == alone(own_lm, job), job.id


def test_non_finite_scores_are_skipped_or_ranked_first(tiny_lm: LoadedModel) -> None:
    sampled = SamplingParams(max_new_tokens=5, temperature=0.5, seed=1)
    params = [greedy(5), greedy(5), sampled, greedy(5)]
    rows = [
        new_row(tiny_lm, str(i), ids_of(tiny_lm, PROMPTS[i % 3]), p) for i, p in enumerate(params)
    ]
    batch = Batch.prefill(tiny_lm, rows)
    with torch.inference_mode():
        logits = forward_all(tiny_lm, [batch]).clone()
        best = int(logits[1].argmax())
        logits[0] = float("nan")  # nothing to sample
        logits[1, best] = float("nan")  # the runner-up wins
        runner_up = int(logits[1].nan_to_num(float("-inf")).argmax())
        logits[2:, 7] = float("inf")  # wins, whatever the temperature
        logits[3, 9] = float("-inf")
        step = batch.advance(logits, eos_ids=torch.tensor([], dtype=torch.long))
        after = batch.filter([i for i, code in enumerate(step.codes) if code])
    # Row 0 fails (the text side answers it with `numerical_error`), the others go on.
    assert [code & FAILED for code in step.codes] == [FAILED, 0, 0, 0]
    assert after is not None
    assert [row.request_id for row in after.rows] == ["3", "1", "2"]
    assert runner_up != best
    assert step.tokens[1:] == [runner_up, 7, 7]


def test_a_vanishing_temperature_is_greedy(tiny_lm: LoadedModel) -> None:
    tiny = SamplingParams(max_new_tokens=20, temperature=1e-40, top_k=5, seed=9)
    jobs = [Job(str(i), p, tiny, at_step=i) for i, p in enumerate(PROMPTS)]
    out = run(tiny_lm, jobs)
    for job in jobs:
        assert out.done[job.id].token_ids == reference(tiny_lm, job.prompt, 20)


def test_sampling_skips_nan_and_ranks_infinite_scores_first() -> None:
    logits = torch.full((1, 8), float("nan"))
    logits[0, 2] = 1.0
    logits[0, 5] = float("inf")
    logits[0, 6] = float("-inf")
    for temperature in (1e-3, 0.7, 2.0):
        params = SamplingParams(max_new_tokens=1, temperature=temperature, top_p=0.9, seed=1)
        assert sample(logits, [params]) == [5]
    logits[0, 5] = float("nan")
    params = SamplingParams(max_new_tokens=1, temperature=1e-3)
    assert sample(logits, [params]) == [2]


def test_a_chat_template_that_raises_fails_only_its_job(own_lm: LoadedModel) -> None:
    own_lm.tokenizer.chat_template = (
        "{% if messages[-1]['content'] == 'forbidden' %}"
        "{{ raise_exception('this model does not discuss forbidden things') }}"
        "{% endif %}" + CHAT_TEMPLATE
    )
    jobs = [
        Job("ok", PROMPTS[1], greedy(15), chat=True),
        Job("refused", "forbidden", greedy(15), chat=True),
        Job("plain", PROMPTS[2], greedy(15)),
    ]
    out = run(own_lm, jobs)
    assert out.errors["refused"].code == "invalid_prompt"
    assert "this model does not discuss forbidden things" in str(out.errors["refused"])
    assert out.done["ok"].token_ids == reference(own_lm, PROMPTS[1], 15, chat=True)
    assert out.done["plain"].token_ids == reference(own_lm, PROMPTS[2], 15)


def test_a_row_whose_detokenizer_raises_fails_alone(
    own_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A row's stream decodes its first tokens after the last prompt tokens; the tokenizer's
    # incremental decoder fails on those that follow one prompt only.
    context = ids_of(own_lm, POISONED_PROMPT)[-5:]

    class FailingDecodeStream:
        def __init__(self, skip_special_tokens: bool) -> None:
            self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            self.seen: list[int] = []

        def step(self, tokenizer: Tokenizer, token: int) -> str | None:
            self.seen.append(token)
            if self.seen[: len(context)] == context and len(self.seen) > len(context):
                raise ValueError("undecodable bytes")
            return self.stream.step(tokenizer, token)

    monkeypatch.setattr(textstream, "DecodeStream", FailingDecodeStream)
    jobs = [
        Job("a", PROMPTS[0], greedy(20)),
        Job("broken", POISONED_PROMPT, SamplingParams(max_new_tokens=20, stop=("zz",)), 2),
        Job("b", PROMPTS[1], greedy(20), at_step=2),
    ]
    out = run(own_lm, jobs)
    assert out.errors["broken"].code == "detokenization_failed"
    assert "undecodable bytes" in str(out.errors["broken"])
    for job in (jobs[0], jobs[2]):
        assert out.done[job.id].token_ids == reference(own_lm, job.prompt, 20)
        assert out.text[job.id] == out.done[job.id].text


def forward_fails(
    lm: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
    at: Callable[[int], bool],
    engines: list[Engine],
) -> Callable[[int, Engine], object]:
    """The forward pass of every step for which `at(step)` holds raises `error`, past every
    layer (their caches have grown); the before-step hook for `run`, which also keeps the
    engine in `engines`."""
    final_norm = lm.model.model.norm
    norm = final_norm.forward
    current = [-1]

    def forward(hidden: torch.Tensor) -> object:
        if at(current[0]):
            raise error
        return norm(hidden)

    monkeypatch.setattr(final_norm, "forward", forward)

    def before_step(step: int, engine: Engine) -> None:
        current[0] = step
        if not engines:
            engines.append(engine)

    return before_step


def test_a_failed_step_fails_its_rows_and_the_engine_goes_on(
    own_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    engines: list[Engine] = []
    hook = forward_fails(
        own_lm, monkeypatch, RuntimeError("kaboom"), lambda step: step in (4, 7), engines
    )
    # Two rows at a time: a and b run when step 4 fails, c and d when step 7 fails.
    jobs = [Job(i, PROMPTS[n % 3], greedy(20)) for n, i in enumerate("abcdf")]
    jobs.append(Job("late", PROMPTS[1], greedy(20), at_step=9))
    out = run(own_lm, jobs, limits=EngineLimits(max_batch_size=2), before_step=hook)
    for failed in "abcd":
        assert out.errors[failed].code == "engine_error"
        assert "RuntimeError: kaboom" in str(out.errors[failed])
    # f waited through both faults; faults with a good step between them are not "in a row".
    for job in (jobs[4], jobs[5]):
        assert out.done[job.id].token_ids == reference(own_lm, job.prompt, 20)
    assert engines[0].health().fatal is None


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("CUDA error: an illegal memory access was encountered"),
        torch.AcceleratorError("CUDA error: device-side assert triggered"),
    ],
)
def test_a_device_error_is_fatal(
    own_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch, error: RuntimeError
) -> None:
    engines: list[Engine] = []
    hook = forward_fails(own_lm, monkeypatch, error, lambda step: step == 3, engines)
    jobs = [Job(i, PROMPTS[n % 3], greedy(20)) for n, i in enumerate("abc")]
    jobs.append(Job("later", PROMPTS[0], greedy(5), at_step=6))
    out = run(own_lm, jobs, limits=EngineLimits(max_batch_size=2), before_step=hook)
    # The rows of the failed step fail; the waiting row c is left for the restarted worker.
    assert {rid: e.code for rid, e in out.errors.items()} == dict.fromkeys(
        ["a", "b"], "engine_error"
    )
    assert "c" not in out.done
    fatal = engines[0].health().fatal
    assert fatal is not None
    assert "device error" in fatal
    assert str(error) in fatal


def test_step_faults_in_a_row_are_fatal(
    own_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    engines: list[Engine] = []
    hook = forward_fails(own_lm, monkeypatch, ValueError("bad shape"), lambda _: True, engines)
    jobs = [Job(str(step), PROMPTS[step % 3], greedy(5), at_step=step) for step in range(4)]
    out = run(own_lm, jobs, before_step=hook)
    assert {rid: e.code for rid, e in out.errors.items()} == dict.fromkeys("012", "engine_error")
    assert "the engine failed a step (ValueError: bad shape)" in str(out.errors["2"])
    assert engines[0].health().fatal == "3 step faults in a row, the last: ValueError: bad shape"


def wait_for(condition: Callable[[], bool], timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def submit(engine: Engine, request_id: str) -> None:
    engine.submit(EngineRequest(request_id, GenerationRequest(prompt="Hi"), greedy(5), 1e18))


def test_the_engine_thread_survives_a_failing_step_and_reports_its_health(
    own_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = Collector()
    lock = threading.Lock()
    seen: list[EngineHealth] = []

    def on_step(outputs: list[RowOutput]) -> None:
        with lock:
            out(outputs)

    engine = Engine(own_lm, EngineLimits(), on_step)
    norm = own_lm.model.model.norm.forward

    def broken(hidden: torch.Tensor) -> object:
        seen.append(engine.health())
        raise RuntimeError("kaboom")

    assert engine.health() == EngineHealth(
        alive=False, stopped=False, step_started=None, fatal=None
    )
    monkeypatch.setattr(own_lm.model.model.norm, "forward", broken)
    engine.start()
    try:
        before = time.monotonic()
        submit(engine, "a")
        assert wait_for(lambda: "a" in out.errors)
        monkeypatch.setattr(own_lm.model.model.norm, "forward", norm)
        submit(engine, "b")
        assert wait_for(lambda: "b" in out.done)
        # Idle again: waiting for work is no step.
        assert wait_for(lambda: engine.health().step_started is None)
        health = engine.health()
    finally:
        engine.stop()
    assert out.errors["a"].code == "engine_error"
    assert out.done["b"].completion_tokens == 5
    started = seen[0].step_started
    assert seen[0].alive
    assert started is not None
    assert before <= started <= time.monotonic()
    assert health == EngineHealth(alive=True, stopped=False, step_started=None, fatal=None)
    assert engine.health() == EngineHealth(alive=False, stopped=True, step_started=None, fatal=None)


class _Abort(BaseException):
    """Not an Exception: what no step handler may swallow (a SystemExit, say)."""


def test_an_engine_thread_killed_by_a_base_exception_shows_in_health(
    own_lm: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def killed(hidden: torch.Tensor) -> object:
        raise _Abort("gone")

    engine = Engine(own_lm, EngineLimits(), Collector())
    monkeypatch.setattr(own_lm.model.model.norm, "forward", killed)
    engine.start()
    try:
        submit(engine, "a")
        assert wait_for(lambda: not engine.health().alive)
        health = engine.health()
    finally:
        engine.stop()
    assert not health.stopped
    assert health.fatal == "the engine thread died: _Abort('gone')"


def test_an_on_step_that_raises_makes_the_engine_give_up(own_lm: LoadedModel) -> None:
    # The text side hands the outputs on: once that fails, no request can be answered.
    def broken(outputs: list[RowOutput]) -> None:
        raise RuntimeError("publisher gone")

    engine = Engine(own_lm, EngineLimits(), broken)
    engine.start()
    try:
        submit(engine, "a")
        assert wait_for(lambda: not engine.health().alive)
        health = engine.health()
    finally:
        engine.stop()
    assert not health.stopped
    assert health.fatal == "the detokenizer thread failed: RuntimeError('publisher gone')"
