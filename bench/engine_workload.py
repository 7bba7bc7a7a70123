"""The engine benchmark's workload and the systems it measures: chat prompts of mixed lengths,
transformers' own ways of generating, and the engine in closed loops."""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from transformers import GenerationConfig

from gateway.schemas import ChatMessage, GenerationRequest
from worker import metrics
from worker.engine import DecodeConfig, Engine, EngineLimits, EngineRequest, RowOutput
from worker.engine.generation import build_prompt_ids
from worker.engine.model import LoadedModel
from worker.engine.sampling import SamplingParams

TOPICS = [
    "the history of the printing press",
    "how rainbows form",
    "why the sky is blue",
    "the rules of chess",
    "how vaccines train the immune system",
    "the water cycle",
    "what a compiler does",
    "the life of honey bees",
]
FILLER = (
    "Please be precise, use plain words, and give one concrete example that a curious "
    "student could check for themselves. "
)


@dataclass(frozen=True)
class Item:
    prompt_ids: list[int]
    request: GenerationRequest
    max_new_tokens: int


def workload(lm: LoadedModel, n: int, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        # Numbered first, so no two prompts share more than the chat template and its system
        # prompt: repeats would flatter the engine's prefix cache.
        text = f"{i + 1}. Explain {TOPICS[i % len(TOPICS)]}. " + FILLER * rng.randint(0, 2)
        request = GenerationRequest(messages=[ChatMessage(role="user", content=text)])
        items.append(Item(build_prompt_ids(lm, request), request, rng.randint(16, 128)))
    return items


def _generate(lm: LoadedModel, batch: list[list[int]], max_new_tokens: int) -> None:
    longest = max(map(len, batch))
    pad = lm.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in batch], device=lm.device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch], device=lm.device)
    lm.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,  # ignore end-of-sequence: exact token counts
        do_sample=False,
        pad_token_id=pad,
    )


def sequential(lm: LoadedModel, items: list[Item]) -> float:
    started = time.perf_counter()
    for item in items:
        _generate(lm, [item.prompt_ids], item.max_new_tokens)
    return sum(i.max_new_tokens for i in items) / (time.perf_counter() - started)


def static_batch(lm: LoadedModel, items: list[Item]) -> float:
    started = time.perf_counter()
    _generate(lm, [i.prompt_ids for i in items], max(i.max_new_tokens for i in items))
    return sum(i.max_new_tokens for i in items) / (time.perf_counter() - started)


def hf_generate_batch(lm: LoadedModel, items: list[Item]) -> float:
    new_tokens = round(statistics.mean(i.max_new_tokens for i in items))
    config = GenerationConfig(  # type: ignore[no-untyped-call]  # transformers is untyped
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    inputs = [i.prompt_ids for i in items]
    lm.model.generate_batch(inputs=inputs[:2], generation_config=config)  # warm-up
    started = time.perf_counter()
    outputs = lm.model.generate_batch(inputs=inputs, generation_config=config)
    elapsed = time.perf_counter() - started
    return sum(len(o.generated_tokens) for o in outputs.values()) / elapsed


# What the loops ask of every request but its length: greedy, every token counted.
PLAIN = SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True)


class EngineDriver:
    """Runs the engine thread and lets the benchmark wait for requests to finish; `reset`
    between loops serves several loops with one engine (and one start-up). Requests sample
    with `params`, at their item's length."""

    def __init__(
        self,
        lm: LoadedModel,
        limits: EngineLimits,
        decode: DecodeConfig | None = None,
        params: SamplingParams = PLAIN,
    ) -> None:
        self.params = params
        self.first: dict[str, float] = {}  # when a request's first output came
        self.finished: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.errors: list[str] = []
        self._cond = threading.Condition()
        # Its step series recorded as the worker records them.
        self.engine = Engine(lm, limits, self._on_step, decode, on_stats=metrics.EngineMetrics())
        self.engine.start()
        self.used = 0  # workload items submitted so far: a later loop takes new prompts

    def reset(self) -> None:
        with self._cond:
            self.first.clear()
            self.finished.clear()
            self.tokens.clear()

    def _on_step(self, outputs: list[RowOutput]) -> None:
        now = time.perf_counter()
        with self._cond:
            for out in outputs:
                self.first.setdefault(out.request_id, now)
                if out.finished is not None:
                    self.finished[out.request_id] = now
                    self.tokens[out.request_id] = out.finished.completion_tokens
                elif out.error is not None:
                    self.errors.append(f"{out.request_id}: {out.error}")
                    self.finished[out.request_id] = now
                    self.tokens[out.request_id] = 0
            self._cond.notify_all()

    def submit(self, request_id: str, item: Item, max_new_tokens: int | None = None) -> None:
        params = replace(self.params, max_new_tokens=max_new_tokens or item.max_new_tokens)
        self.submit_request(request_id, item.request, params)

    def submit_request(
        self, request_id: str, request: GenerationRequest, params: SamplingParams
    ) -> None:
        self.engine.submit(EngineRequest(request_id, request, params, float("inf")))

    def wait(self, done: Callable[[], bool]) -> None:
        with self._cond:
            self._cond.wait_for(done)

    def close(self) -> None:
        self.engine.stop()
        if self.errors:
            raise RuntimeError(f"requests failed: {self.errors}")


@dataclass(frozen=True)
class LoopResult:
    steady_tok_s: float  # while `concurrency` requests were in flight
    whole_run_tok_s: float  # from the first submission to the last completion


def engine_closed_loop(
    lm: LoadedModel,
    items: list[Item],
    concurrency: int,
    total: int,
    prefix_cache: bool = True,
    params: SamplingParams = PLAIN,
) -> LoopResult:
    """`closed_loop` on an engine of its own, of at least 32 rows, its requests sampling with
    `params`."""
    limits = EngineLimits(max_batch_size=max(32, concurrency))
    if not prefix_cache:
        limits = replace(limits, prefix_cache_bytes=0)
    driver = EngineDriver(lm, limits, params=params)
    try:
        return closed_loop(driver, items, concurrency, total)
    finally:
        driver.close()


def closed_loop(
    driver: EngineDriver, items: list[Item], concurrency: int, total: int
) -> LoopResult:
    """Keep `concurrency` requests in flight until `total` were submitted, then drain.

    The steady-state rate counts the tokens of requests that completed between the end of the
    first wave (the `concurrency`-th completion) and the last submission: all that time, exactly
    `concurrency` requests were in flight. The whole-run rate includes the start and the drain,
    when fewer are.
    """
    driver.reset()
    started = time.perf_counter()
    submitted = 0
    last_submitted = started
    while len(driver.finished) < total:
        while submitted < total and submitted - len(driver.finished) < concurrency:
            item = items[(driver.used + submitted) % len(items)]
            driver.submit(f"{driver.used + submitted}", item)
            submitted += 1
            last_submitted = time.perf_counter()
        seen = len(driver.finished)
        driver.wait(lambda seen=seen: len(driver.finished) > seen)  # type: ignore[misc]
    elapsed = time.perf_counter() - started
    driver.used += total
    if driver.errors:
        raise RuntimeError(f"requests failed: {driver.errors}")
    first_wave = sorted(driver.finished.values())[concurrency - 1]
    steady = [
        driver.tokens[rid]
        for rid, at in driver.finished.items()
        if first_wave < at <= last_submitted
    ]
    return LoopResult(
        steady_tok_s=sum(steady) / (last_submitted - first_wave),
        whole_run_tok_s=sum(driver.tokens.values()) / elapsed,
    )


def short_request_ratio(lm: LoadedModel, items: list[Item]) -> float:
    driver = EngineDriver(lm, EngineLimits(max_batch_size=32))
    started = time.perf_counter()
    for i in range(16):
        driver.submit(f"long{i}", items[i % len(items)], max_new_tokens=256)
    # Let the long batch get going, then slip a short request in.
    driver.wait(lambda: driver.engine.running == 16)
    time.sleep(1.0)
    short_started = time.perf_counter()
    driver.submit("short", items[0], max_new_tokens=4)
    driver.wait(lambda: "short" in driver.finished)
    short_s = driver.finished["short"] - short_started
    driver.wait(lambda: len(driver.finished) == 17)
    batch_s = max(driver.finished.values()) - started
    driver.close()
    return short_s / batch_s
