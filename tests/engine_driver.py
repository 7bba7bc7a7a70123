"""Drive an engine step by step, as its thread would, and collect what it reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gateway.schemas import ChatMessage, GenerationRequest
from worker import metrics
from worker.engine import Engine, EngineLimits, EngineRequest, Resume, RowOutput
from worker.engine.config import DecodeConfig, DecodeMode
from worker.engine.generation import Generation, GenerationError, build_prompt_ids
from worker.engine.model import LoadedModel
from worker.engine.sampling import SamplingParams

PROMPTS = [
    "Hi",
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a small model that",
]

SHARED_START = "You are a careful assistant: answer briefly, precisely, and in plain words. "


@dataclass
class Collector:
    text: dict[str, str] = field(default_factory=dict)
    done: dict[str, Generation] = field(default_factory=dict)
    errors: dict[str, GenerationError] = field(default_factory=dict)
    batch_sizes: list[int] = field(default_factory=list)
    outputs: list[RowOutput] = field(default_factory=list)  # all of them, in order
    mode: DecodeMode | None = None  # how the engine decoded, at the end

    def __call__(self, outputs: list[RowOutput]) -> None:
        self.outputs += outputs
        for out in outputs:
            ended = out.request_id in self.done or out.request_id in self.errors
            assert not ended, f"{out.request_id} was answered twice"
            self.text[out.request_id] = self.text.get(out.request_id, "") + out.text
            if out.finished is not None:
                self.done[out.request_id] = out.finished
            if out.error is not None:
                self.errors[out.request_id] = out.error


@dataclass
class Job:
    id: str
    prompt: str
    params: SamplingParams
    at_step: int = 0  # the step before which it is submitted
    chat: bool = False
    resume: Resume | None = None  # what an earlier attempt of it published


def run(
    lm: LoadedModel,
    jobs: list[Job],
    limits: EngineLimits | None = None,
    cancel: dict[int, str] | None = None,
    before_step: Callable[[int, Engine], object] | None = None,
    decode: DecodeConfig | None = None,
) -> Collector:
    out = Collector()
    engine = Engine(lm, limits or EngineLimits(), out, decode, on_stats=metrics.EngineMetrics())
    try:
        drive(engine, out, jobs, cancel, before_step)
    finally:
        engine.stop()
    out.mode = engine.decode_mode
    return out


def drive(
    engine: Engine,
    out: Collector,
    jobs: list[Job],
    cancel: dict[int, str] | None,
    before_step: Callable[[int, Engine], object] | None,
) -> None:
    """Step the engine until every job is answered, each step's outputs delivered before the
    next step (so a stop string ends its row at the next step, always)."""
    step = 0
    # A fatal fault ends the engine's thread; the rows it did not answer run elsewhere.
    while len(out.done) + len(out.errors) < len(jobs) and engine.health().fatal is None:
        for job in jobs:
            if job.at_step == step:
                request = (
                    GenerationRequest(messages=[ChatMessage(role="user", content=job.prompt)])
                    if job.chat
                    else GenerationRequest(prompt=job.prompt)
                )
                engine.submit(
                    EngineRequest(
                        job.id, request, job.params, deadline=float("inf"), resume=job.resume
                    )
                )
        if cancel and step in cancel:
            engine.cancel(cancel[step])
        if before_step:
            before_step(step, engine)
        engine.step()
        engine.flush()
        out.batch_sizes.append(engine.running)
        step += 1
        assert step < 10_000, "engine made no progress"


def reference(lm: LoadedModel, prompt: str, max_new_tokens: int, chat: bool = False) -> list[int]:
    """model.generate on the prompt alone: what the batched engine must reproduce."""
    request = (
        GenerationRequest(messages=[ChatMessage(role="user", content=prompt)])
        if chat
        else GenerationRequest(prompt=prompt)
    )
    ids = torch.tensor([build_prompt_ids(lm, request)], device=lm.device)
    out = lm.model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return list(out[0, ids.shape[1] :].tolist())


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)
