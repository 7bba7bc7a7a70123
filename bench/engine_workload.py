"""The engine benchmark's workload and the systems it measures: chat prompts of mixed lengths,
transformers' own ways of generating, and the engine in closed loops.

Every system runs as a closed loop and is measured the same way (`LoopRecord`): over the
window in which it had its full number of requests in flight, counting only the tokens generated
inside that window. The engine refills per request; `model.generate` one request at a time is a
loop of one; a static batch and `generate_batch` refill per wave, as a server built on them would.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

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


@dataclass
class LoopRecord:
    """What a closed loop of `concurrency` requests saw, on `time.perf_counter`'s clock: when each
    request was submitted and answered, and when its tokens were generated (`tokens`: (when, how
    many), one entry a step or a token)."""

    concurrency: int
    submitted: list[float] = field(default_factory=list)
    answered: list[float] = field(default_factory=list)
    tokens: list[tuple[float, int]] = field(default_factory=list)

    def steady_window(self) -> tuple[float, float]:
        """From the `concurrency`-th answer to the last submission: all that time, `concurrency`
        requests were in flight (for a wave, from the end of the first to the start of the last).
        """
        return sorted(self.answered)[self.concurrency - 1], max(self.submitted)

    @property
    def steady_tok_s(self) -> float:
        start, end = self.steady_window()
        tokens = tokens_between(self.tokens, start, end)
        if tokens == 0:
            raise ValueError(
                f"no tokens between the {self.concurrency}-th answer and the last submission: "
                "a loop needs more requests (three waves at least) for a steady state"
            )
        return tokens / (end - start)

    @property
    def whole_run_tok_s(self) -> float:
        """From the first submission to the last answer, start and drain included."""
        elapsed = max(self.answered) - min(self.submitted)
        return sum(count for _, count in self.tokens) / elapsed


def tokens_between(tokens: Iterable[tuple[float, int]], start: float, end: float) -> int:
    """The tokens generated after `start` and up to `end`: a request in flight at either edge
    contributes only what it made inside."""
    return sum(count for at, count in tokens if start < at <= end)


class _StepClock(BaseStreamer):
    """Stamps each step of `model.generate` with the tokens it is credited with: one for each row
    whose request asked for that many tokens or more (a static batch's padding steps earn none).
    `generate` hands the prompt to `put` first, then each step's new tokens."""

    def __init__(self, lengths: list[int], record: LoopRecord) -> None:
        self.lengths = lengths
        self.record = record
        self.steps = -1  # the prompt's `put` is not a step

    def put(self, value: torch.Tensor) -> None:
        self.steps += 1
        credited = sum(1 for n in self.lengths if n >= self.steps)
        if self.steps and credited:
            self.record.tokens.append((time.perf_counter(), credited))

    def end(self) -> None:
        pass


def _generate(lm: LoadedModel, batch: list[Item], record: LoopRecord) -> None:
    """One padded `model.generate` over `batch`, every row as long as the longest request asks,
    submitted and answered at once."""
    prompts = [i.prompt_ids for i in batch]
    lengths = [i.max_new_tokens for i in batch]
    longest = max(map(len, prompts))
    pad = lm.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompts], device=lm.device)
    mask = torch.tensor(
        [[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=lm.device
    )
    record.submitted.extend([time.perf_counter()] * len(batch))
    lm.model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max(lengths),
        min_new_tokens=max(lengths),  # ignore end-of-sequence: exact token counts
        do_sample=False,
        pad_token_id=pad,
        streamer=_StepClock(lengths, record),
    )
    record.answered.extend([time.perf_counter()] * len(batch))


def _waves(items: list[Item], batch: int) -> list[list[Item]]:
    if len(items) < 3 * batch:
        raise ValueError(
            f"{len(items)} requests make fewer than three waves of {batch}: the first and the "
            "last are outside the steady state"
        )
    return [items[i : i + batch] for i in range(0, len(items) - batch + 1, batch)]


def sequential(lm: LoadedModel, items: list[Item]) -> LoopRecord:
    """`model.generate` one request at a time: a closed loop of one (three requests at least)."""
    record = LoopRecord(concurrency=1)
    for item in items:
        _generate(lm, [item], record)
    return record


def static_batch(lm: LoadedModel, items: list[Item], batch: int) -> LoopRecord:
    """Padded `model.generate` calls over waves of `batch` requests, back to back."""
    record = LoopRecord(concurrency=batch)
    for wave in _waves(items, batch):
        _generate(lm, wave, record)
    return record


def hf_generate_batch(lm: LoadedModel, items: list[Item], batch: int) -> LoopRecord:
    """transformers' `generate_batch` over waves of `batch` requests, back to back, each request
    generating the workload's mean max_new_tokens (it takes one length for all)."""
    new_tokens = round(statistics.mean(i.max_new_tokens for i in items))
    config = GenerationConfig(  # type: ignore[no-untyped-call]  # transformers is untyped
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    record = LoopRecord(concurrency=batch)
    try:
        for wave in _waves(items, batch):
            record.submitted.extend([time.perf_counter()] * len(wave))
            # One manager for every wave, as a server would keep it: only the first wave, outside
            # the window, pays for setting it up.
            outputs = lm.model.generate_batch(
                inputs=[i.prompt_ids for i in wave],
                generation_config=config,
                record_timestamps=True,
                persistent_manager=True,
            )
            record.answered.extend([time.perf_counter()] * len(wave))
            for output in outputs.values():
                assert output.timestamps is not None, "asked for with record_timestamps"
                record.tokens.extend((at, 1) for at in output.timestamps)
    finally:
        lm.model.destroy_cached_continuous_batching_manager()
    return record


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
        self.steps: list[tuple[float, int]] = []  # when each step's tokens came, and how many
        self._counted: dict[str, int] = {}  # each request's tokens in `steps` so far
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
            self.steps.clear()
            self._counted.clear()

    def _on_step(self, outputs: list[RowOutput]) -> None:
        now = time.perf_counter()
        with self._cond:
            made = 0
            for out in outputs:
                self.first.setdefault(out.request_id, now)
                # `tokens` counts the request's tokens so far; a step that held its text back
                # sent no output, and its token is counted with the next.
                if out.tokens > self._counted.get(out.request_id, 0):
                    made += out.tokens - self._counted.get(out.request_id, 0)
                    self._counted[out.request_id] = out.tokens
                if out.finished is not None:
                    self.finished[out.request_id] = now
                    self.tokens[out.request_id] = out.finished.completion_tokens
                elif out.error is not None:
                    self.errors.append(f"{out.request_id}: {out.error}")
                    self.finished[out.request_id] = now
                    self.tokens[out.request_id] = 0
            if made:
                self.steps.append((now, made))
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


def engine_closed_loop(
    lm: LoadedModel,
    items: list[Item],
    concurrency: int,
    total: int,
    prefix_cache: bool = True,
    params: SamplingParams = PLAIN,
) -> LoopRecord:
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
) -> LoopRecord:
    """Keep `concurrency` requests in flight until `total` were submitted, then drain; the
    record's `steady_tok_s` counts the tokens the engine's steps made in its steady window."""
    driver.reset()
    record = LoopRecord(concurrency)
    while len(driver.finished) < total:
        while len(record.submitted) < total and (
            len(record.submitted) - len(driver.finished) < concurrency
        ):
            index = driver.used + len(record.submitted)
            record.submitted.append(time.perf_counter())
            driver.submit(f"{index}", items[index % len(items)])
        seen = len(driver.finished)
        driver.wait(lambda seen=seen: len(driver.finished) > seen)  # type: ignore[misc]
    driver.used += total
    if driver.errors:
        raise RuntimeError(f"requests failed: {driver.errors}")
    # Every request is answered: the engine reports nothing more of this loop.
    record.answered = list(driver.finished.values())
    record.tokens = list(driver.steps)
    return record


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
