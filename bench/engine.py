"""Throughput of the batching engine against transformers' own ways of generating.

    python -m bench.engine [--json] [--model PATH_OR_HUB_ID]
    python -m bench.engine --overhead [--json]   # the engine's own cost: bench/engine_overhead.py

Runs on the default model (or --model) on this machine's device, with chat prompts of mixed
lengths (about 40 to 100 tokens with the model's chat template) and max_new_tokens between 16
and 128, drawn from a fixed seed. Every system generates
exactly the tokens each request asks for (end-of-sequence is ignored), so tokens/s compare like
with like; static batches are credited only with the tokens their requests asked for, not with
the padding steps.

Measured in one run:
- sequential_tok_s: `model.generate`, one request at a time (8 requests), measured before the
  static batch and again after the engine's loop at 16, averaged: the figures the targets
  compare are measured back to back, since this machine's speed drifts over a run
  (sequential_tok_s_before_after: the two measurements);
- static_batch_tok_s: one padded `model.generate` call over 16 requests;
- hf_generate_batch_tok_s: transformers' continuous batching (`generate_batch`) on 16 requests,
  each generating the workload's mean max_new_tokens (it takes one length for all);
- engine_tok_s_by_concurrency: genq's engine with 1, 4, 16 and 32 requests in flight, in steady
  state (a closed loop over 8 x that many requests, counting the requests completed while that
  many were in flight; see engine_closed_loop), engine_tok_s being the figure at 16;
  engine_whole_run_tok_s_by_concurrency: the same loops from first submission to last
  completion, start and drain included;
  engine_tok_s_without_prefix_cache: the loop at 16 with the prefix cache off (the prompts
  share only the chat template and its system prompt);
- short_request_ratio: completion time of a 4-token request submitted while 16 requests of 256
  tokens decode, as a fraction of that batch's time.
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import orjson
import torch
from transformers import GenerationConfig

from bench import engine_overhead
from common.schemas import ChatMessage, GenerationRequest
from common.settings import Settings
from worker.engine import Engine, EngineLimits, EngineRequest, RowOutput
from worker.engine.generation import build_prompt_ids
from worker.engine.sampling import SamplingParams
from worker.loading import LoadedModel, load_model

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


class EngineDriver:
    """Runs the engine thread and lets the benchmark wait for requests to finish."""

    def __init__(self, lm: LoadedModel, limits: EngineLimits) -> None:
        self.finished: dict[str, float] = {}
        self.tokens: dict[str, int] = {}
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self.engine = Engine(lm, limits, self._on_step)
        self.engine.start()

    def _on_step(self, outputs: list[RowOutput]) -> None:
        now = time.perf_counter()
        with self._cond:
            for out in outputs:
                if out.finished is not None:
                    self.finished[out.request_id] = now
                    self.tokens[out.request_id] = out.finished.completion_tokens
                elif out.error is not None:
                    self.errors.append(f"{out.request_id}: {out.error}")
                    self.finished[out.request_id] = now
                    self.tokens[out.request_id] = 0
            self._cond.notify_all()

    def submit(self, request_id: str, item: Item, max_new_tokens: int | None = None) -> None:
        params = SamplingParams(
            max_new_tokens=max_new_tokens or item.max_new_tokens, temperature=0.0, ignore_eos=True
        )
        self.engine.submit(EngineRequest(request_id, item.request, params, float("inf")))

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
    lm: LoadedModel, items: list[Item], concurrency: int, total: int, prefix_cache: bool = True
) -> LoopResult:
    """Keep `concurrency` requests in flight until `total` were submitted, then drain.

    The steady-state rate counts the tokens of requests that completed between the end of the
    first wave (the `concurrency`-th completion) and the last submission: all that time, exactly
    `concurrency` requests were in flight. The whole-run rate includes the start and the drain,
    when fewer are.
    """
    limits = EngineLimits(max_batch_size=max(32, concurrency))
    if not prefix_cache:
        limits = replace(limits, prefix_cache_bytes=0)
    driver = EngineDriver(lm, limits)
    started = time.perf_counter()
    submitted = 0
    last_submitted = started
    while len(driver.finished) < total:
        while submitted < total and submitted - len(driver.finished) < concurrency:
            driver.submit(str(submitted), items[submitted % len(items)])
            submitted += 1
            last_submitted = time.perf_counter()
        seen = len(driver.finished)
        driver.wait(lambda seen=seen: len(driver.finished) > seen)  # type: ignore[misc]
    elapsed = time.perf_counter() - started
    driver.close()
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--model", default=None, help="checkpoint; default: the default model")
    parser.add_argument(
        "--overhead", action="store_true", help="the engine's per-step and per-row cost"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.overhead:
        _overhead(args.json)
        return

    lm = load_model(Settings(model=args.model))
    # As many distinct prompts as the longest loop submits: a prompt seen twice would be served
    # from the prefix cache.
    items = workload(lm, 256)
    say = (lambda *_: None) if args.json else print
    say(f"model {lm.name} on {lm.device} ({lm.dtype}), torch threads {torch.get_num_threads()}")
    lengths = [len(i.prompt_ids) for i in items]
    say(
        f"prompts {min(lengths)}-{max(lengths)} tokens (mean {statistics.mean(lengths):.0f}), "
        f"max_new_tokens 16-128 (mean {statistics.mean(i.max_new_tokens for i in items):.0f})"
    )

    # The three figures the targets compare are measured back to back, the engine between two
    # sequential runs: this machine's speed drifts by up to a third within a run.
    with torch.inference_mode():
        seq_before = sequential(lm, items[:8])
        say(f"sequential            {seq_before:8.1f} tok/s")
        static = static_batch(lm, items[:16])
        say(f"static batch of 16    {static:8.1f} tok/s")
    loops = {16: engine_closed_loop(lm, items, 16, total=128)}
    say(f"engine, 16 in flight  {loops[16].steady_tok_s:8.1f} tok/s steady state")
    with torch.inference_mode():
        seq_after = sequential(lm, items[:8])
        hf_batch = hf_generate_batch(lm, items[:16])
    seq = (seq_before + seq_after) / 2
    say(f"sequential, again     {seq_after:8.1f} tok/s (mean {seq:.1f})")
    say(f"HF generate_batch     {hf_batch:8.1f} tok/s")
    for concurrency in (1, 4, 32):
        loops[concurrency] = engine_closed_loop(
            lm, items, concurrency, total=max(8, 8 * concurrency)
        )
    by_concurrency = {str(c): loops[c].steady_tok_s for c in sorted(loops)}
    whole_run = {str(c): loops[c].whole_run_tok_s for c in sorted(loops)}
    for c in sorted(loops):
        say(
            f"engine, {c:2d} in flight  {loops[c].steady_tok_s:8.1f} tok/s steady state, "
            f"{loops[c].whole_run_tok_s:.1f} over the whole run"
        )
    no_prefix = engine_closed_loop(lm, items, 16, total=128, prefix_cache=False).steady_tok_s
    say(f"engine, 16 in flight, prefix cache off {no_prefix:8.1f} tok/s steady state")
    ratio = short_request_ratio(lm, items)
    say(f"short request ratio   {ratio:8.3f}")
    at16 = by_concurrency["16"]
    say(f"engine at 16: {at16 / seq:.2f}x sequential, {at16 / static:.2f}x static batch")
    if args.json:
        figures = {
            "sequential_tok_s": seq,
            "sequential_tok_s_before_after": [seq_before, seq_after],
            "static_batch_tok_s": static,
            "hf_generate_batch_tok_s": hf_batch,
            "engine_tok_s": by_concurrency["16"],
            "engine_tok_s_by_concurrency": by_concurrency,
            "engine_whole_run_tok_s_by_concurrency": whole_run,
            "engine_tok_s_without_prefix_cache": no_prefix,
            "short_request_ratio": ratio,
            "prompt_tokens_mean": statistics.mean(lengths),
        }
        print(orjson.dumps(figures).decode())


def _overhead(as_json: bool) -> None:
    figures = engine_overhead.measure("auto")
    if as_json:
        print(orjson.dumps(figures).decode())
        return
    print(f"on {figures['device']}; rows: mixed greedy and sampled (greedy alone)")
    mixed, greedy = figures["step_ms_by_rows"], figures["step_ms_by_rows_greedy"]
    assert isinstance(mixed, dict)
    assert isinstance(greedy, dict)
    for rows, ms in mixed.items():
        print(f"{rows:>4} rows  {ms:8.2f} ms a step ({greedy[rows]:.2f})")
    print(
        f"step_overhead_ms {figures['step_overhead_ms']:.2f} "
        f"({figures['step_overhead_ms_greedy']:.2f})"
    )
    print(
        f"row_overhead_us  {figures['row_overhead_us']:.1f} "
        f"({figures['row_overhead_us_greedy']:.1f})"
    )


if __name__ == "__main__":
    main()
