"""Throughput of the batching engine against transformers' own ways of generating.

    python -m bench.engine [--json] [--model PATH_OR_HUB_ID]
    python -m bench.engine --overhead [--json]   # the engine's own cost: bench/engine_overhead.py
    python -m bench.engine --penalties [--json]  # rows with every penalty against plain rows
    python -m bench.engine --logprobs [--json]   # rows reporting top_logprobs 5 against plain
    python -m bench.engine --structured [--json] # rows constrained by a JSON schema against plain
    python -m bench.engine --shape NAME [--layers N] [--concurrency 1,16,64,256] [--json]
        [--paths static,eager] [--eager-concurrency 1,16,64] [--sequential 4] [--hf-batch 64]
        [--requests-per-row 4] [--variants] [--no-static-batch] [--tokenizer DIR]
        # a real model shape with random weights, on any device: bench/shapes.py

Runs on the default model (or --model) on this machine's device, with chat prompts of mixed
lengths (about 40 to 100 tokens with the model's chat template) and max_new_tokens between 16
and 128, drawn from a fixed seed. Every system generates
exactly the tokens each request asks for (end-of-sequence is ignored), so tokens/s compare like
with like; static batches are credited only with the tokens their requests asked for, not with
the padding steps.

Every system is measured the same way (bench/engine_workload.py, `LoopRecord`): as a closed loop,
over the window in which it had its full number of requests in flight (from its N-th answer to
its last submission), counting only the tokens generated inside that window, from per-step or
per-token timestamps. None has a prefix cache in the comparison: the engine's is off there, and
measured apart.

Measured in one run:
- sequential_tok_s: `model.generate`, one request at a time (8 requests; the window holds the
  2nd to the 7th), measured before the static batch and again after the engine's loop at 16,
  averaged: the figures the targets compare are measured back to back, since this machine's
  speed drifts over a run (sequential_tok_s_before_after: the two measurements);
- static_batch_tok_s: padded `model.generate` calls over 3 waves of 16 requests (the window
  holds the middle one);
- hf_generate_batch_tok_s: transformers' continuous batching (`generate_batch`) over 3 waves
  of 16 requests, each generating the workload's mean max_new_tokens (it takes one length for
  all);
- engine_tok_s_by_concurrency: genq's engine with 1, 4, 16 and 32 requests in flight, prefix
  cache off, in steady state (a closed loop over 8 x that many requests; see closed_loop),
  engine_tok_s being the figure at 16;
  engine_whole_run_tok_s_by_concurrency: the same loops from first submission to last
  completion, start and drain included;
  engine_tok_s_with_prefix_cache: the loop at 16 with the prefix cache on, as the worker runs
  it (the prompts share only the chat template and its system prompt);
- short_request_ratio: completion time of a 4-token request submitted while 16 requests of 256
  tokens decode, as a fraction of that batch's time.

`--penalties` runs the loop at 16 in flight three times back to back: sampled rows (temperature
0.8), the same rows with every penalty and bias (presence, frequency and repetition penalties,
ten logit biases, min-p), and the plain rows again; penalties_ratio is the penalised rows'
tokens/s over the mean of the plain rows'. `--logprobs` does the same with rows that report
each token's logprob and its 5 likeliest (top_logprobs 5): logprobs_ratio. `--structured` with
every row constrained by a JSON schema (an array of records: enums, bounded integers, strings),
structured_ratio; and, apart, what a grammar costs: compiling each of the schemas of
`STRUCTURED_SCHEMAS` (compile_ms) and one step's masks for 16 rows following one along a valid
answer (mask_us_per_step, mask_us_per_row; computed while the forward pass runs, in the engine).
"""

from __future__ import annotations

import argparse
import logging
import statistics
from dataclasses import replace
from pathlib import Path

import orjson
import torch

from bench import engine_overhead, shapes, structured
from bench.engine_workload import (
    PLAIN,
    engine_closed_loop,
    hf_generate_batch,
    sequential,
    short_request_ratio,
    static_batch,
    workload,
)
from bench.structured import STRUCTURED_SCHEMAS
from common.settings import Settings
from worker.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--model", default=None, help="checkpoint; default: the default model")
    parser.add_argument(
        "--overhead", action="store_true", help="the engine's per-step and per-row cost"
    )
    parser.add_argument(
        "--penalties", action="store_true", help="rows with every penalty against plain rows"
    )
    parser.add_argument(
        "--logprobs", action="store_true", help="rows reporting top_logprobs 5 against plain rows"
    )
    parser.add_argument(
        "--structured", action="store_true", help="rows constrained by a JSON schema against plain"
    )
    parser.add_argument("--shape", choices=sorted(shapes.SHAPES), help="a real model's shape")
    parser.add_argument("--layers", type=int, default=None, help="--shape with fewer layers")
    parser.add_argument(
        "--concurrency", default="1,16,64,256", help="--shape: requests in flight, comma-separated"
    )
    shapes_options(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.overhead:
        _overhead(args.json)
        return
    if args.penalties or args.logprobs or args.structured:
        feature = next(f for f in ("penalties", "logprobs", "structured") if getattr(args, f))
        _feature_cost(feature, args.json, args.model)
        return
    if args.shape:
        lm = shapes.build(args.shape, Settings(), layers=args.layers, tokenizer_dir=args.tokenizer)
        figures = shapes.measure(lm, shape_plan(args), (lambda _: None) if args.json else print)
        if args.json:
            print(orjson.dumps(figures).decode())
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
    # sequential runs: this machine's speed drifts by up to a third within a run. The baselines
    # have no prefix cache, so the engine's is off where it is compared with them.
    with torch.inference_mode():
        seq_before = sequential(lm, items[:8]).steady_tok_s
        say(f"sequential            {seq_before:8.1f} tok/s")
        static = static_batch(lm, items[:48], 16).steady_tok_s
        say(f"static batches of 16  {static:8.1f} tok/s")
    loops = {16: engine_closed_loop(lm, items, 16, total=128, prefix_cache=False)}
    say(f"engine, 16 in flight  {loops[16].steady_tok_s:8.1f} tok/s steady state")
    with torch.inference_mode():
        seq_after = sequential(lm, items[:8]).steady_tok_s
        hf_batch = hf_generate_batch(lm, items[:48], 16).steady_tok_s
    seq = (seq_before + seq_after) / 2
    say(f"sequential, again     {seq_after:8.1f} tok/s (mean {seq:.1f})")
    say(f"HF generate_batch     {hf_batch:8.1f} tok/s")
    for concurrency in (1, 4, 32):
        loops[concurrency] = engine_closed_loop(
            lm, items, concurrency, total=max(8, 8 * concurrency), prefix_cache=False
        )
    by_concurrency = {str(c): loops[c].steady_tok_s for c in sorted(loops)}
    whole_run = {str(c): loops[c].whole_run_tok_s for c in sorted(loops)}
    for c in sorted(loops):
        say(
            f"engine, {c:2d} in flight  {loops[c].steady_tok_s:8.1f} tok/s steady state, "
            f"{loops[c].whole_run_tok_s:.1f} over the whole run"
        )
    with_prefix = engine_closed_loop(lm, items, 16, total=128).steady_tok_s
    say(f"engine, 16 in flight, prefix cache on {with_prefix:8.1f} tok/s steady state")
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
            "engine_tok_s_with_prefix_cache": with_prefix,
            "short_request_ratio": ratio,
            "prompt_tokens_mean": statistics.mean(lengths),
        }
        print(orjson.dumps(figures).decode())


def shapes_options(parser: argparse.ArgumentParser) -> None:
    def ints(text: str) -> list[int]:
        return [int(c) for c in text.split(",")]

    parser.add_argument("--paths", default="static,eager", help="--shape: engine decode paths")
    parser.add_argument(
        "--eager-concurrency", type=ints, default=None, help="--shape: the eager path's, if fewer"
    )
    parser.add_argument(
        "--sequential", type=int, default=4, help="--shape: generate() requests, 3+"
    )
    parser.add_argument(
        "--hf-batch", type=int, default=64, help="--shape: generate_batch's, a wave"
    )
    parser.add_argument("--requests-per-row", type=int, default=4, help="--shape: loop length")
    parser.add_argument("--variants", action="store_true", help="--shape: static variants at 64")
    parser.add_argument("--no-static-batch", action="store_true", help="--shape: skip it")
    parser.add_argument("--tokenizer", type=Path, default=None, help="--shape: tokenizer dir")


def shape_plan(args: argparse.Namespace, deadline: float = float("inf")) -> shapes.Plan:
    return shapes.Plan(
        concurrency=[int(c) for c in args.concurrency.split(",")],
        paths=tuple(args.paths.split(",")),
        eager_concurrency=args.eager_concurrency,
        sequential_requests=args.sequential,
        static_batch=not args.no_static_batch,
        hf_batch=args.hf_batch,
        requests_per_row=args.requests_per_row,
        variants=args.variants,
        deadline=deadline,
    )


def _feature_cost(feature: str, as_json: bool, model: str | None) -> None:
    """Rows with `feature` (every penalty and bias, or top_logprobs 5) at 16 in flight, between
    two runs of the plain rows."""
    lm = load_model(Settings(model=model))
    items = workload(lm, 384)
    sampled = replace(PLAIN, temperature=0.8, seed=7)
    featured = {
        "penalties": replace(
            sampled,
            presence_penalty=0.5,
            frequency_penalty=0.5,
            repetition_penalty=1.1,
            logit_bias=tuple((token, -2.0) for token in range(100, 110)),
            min_p=0.05,
        ),
        "logprobs": replace(sampled, logprobs=5),
        "structured": replace(sampled, grammar=structured.grammar(STRUCTURED_SCHEMAS[0])),
    }[feature]
    figures: dict[str, object] = structured.costs(lm) if feature == "structured" else {}
    runs = {}
    for name, params in (("plain", sampled), (feature, featured), ("plain_again", sampled)):
        runs[name] = engine_closed_loop(lm, items, 16, total=128, params=params).steady_tok_s
        if not as_json:
            print(f"engine, 16 in flight, {name:12s} {runs[name]:8.1f} tok/s steady state")
    ratio = runs[feature] / statistics.mean((runs["plain"], runs["plain_again"]))
    target = 0.85 if feature == "structured" else 0.9
    if as_json:
        print(orjson.dumps({"tok_s": runs, f"{feature}_ratio": ratio, **figures}).decode())
        return
    for name, value in figures.items():
        print(f"{name} {value}")
    print(f"{feature}_ratio {ratio:.3f} (target >= {target})")


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
