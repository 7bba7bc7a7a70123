"""Randomly initialised models of real shapes, so that the engine benchmark runs on any device
without downloading weights:

    python -m bench.engine --shape NAME [--layers N] [--concurrency 1,16,64,256] [--json]

The sizes are the published configurations'. Every shape uses the default model's tokenizer
(SmolLM2's, 49,152 tokens; `--tokenizer DIR` loads it from a directory instead of the model
cache), so Llama-3-8B's shape has that vocabulary instead of its own 128,256. On the workload of
`bench.engine` (chat prompts, 16-128 new tokens, end-of-sequence ignored): `model.generate` one
request at a time, static batches (3 waves of `generate` over as many requests as the largest
concurrency, at most 64), transformers' `generate_batch` (continuous batching) on 3 waves of 64
requests, and the engine's closed loops, prefix cache off, at each concurrency
(`requests_per_row` x that many requests), each measured as `bench.engine` measures it (its
steady window, the tokens generated inside it), once per decode path: `static` (the static
path, CUDA graphs where CUDA is) and `eager` (the engine of issue 15). One engine per path
serves every concurrency (one start-up, one capture of the graphs); every loop takes prompts no
earlier loop sent.

With `variants`, the static engine also runs the loop at 64 with the prompts prefilled in the
decode rows' eager pass (`fused_prefill`), and with no prefill wait, to compare with its default
(the graph replay, then the prompts' own pass; newcomers waiting up to GENQ_PREFILL_WAIT_STEPS
steps).

Every part runs on its own: one that fails is recorded in `errors` and the others go on, and a
part that would start past `deadline` (time.monotonic()) is skipped.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from bench.engine_workload import (
    EngineDriver,
    Item,
    closed_loop,
    hf_generate_batch,
    sequential,
    static_batch,
    workload,
)
from common.settings import Settings
from worker.engine import DecodeConfig, EngineLimits
from worker.engine.config import describe
from worker.engine.model import LoadedModel
from worker.loading import converted_checkpoint, resolve_device, resolve_dtype
from worker.model_fetch import ensure_default_model

# KV-cache tokens per row of the engines: a slot of the static path holds the longest request
# of the workload (a prompt of about 100 tokens and 128 new ones).
TOKENS_PER_ROW = 384
PATHS = {
    "static": DecodeConfig(static="on"),
    "eager": DecodeConfig(static="off"),
}
VARIANTS: dict[str, dict[str, Any]] = {
    "fused_prefill": {"fused_prefill": True},
    "no_prefill_wait": {"prefill_wait_steps": 0},
}
VARIANT_CONCURRENCY = 64

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rope_theta": 100_000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
    "smollm2-1.7b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "rope_theta": 130_000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    },
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500_000.0,
        "tie_word_embeddings": False,
        "max_position_embeddings": 8192,
    },
}


def tokenizer(settings: Settings, directory: Path | None = None) -> Any:
    if directory is None:
        directory = converted_checkpoint(
            ensure_default_model(settings.model_cache_dir), settings.model_cache_dir
        )
    return AutoTokenizer.from_pretrained(directory)


def config(name: str, vocab_size: int, layers: int | None = None) -> LlamaConfig:
    shape = dict(SHAPES[name])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return LlamaConfig(vocab_size=vocab_size, rms_norm_eps=1e-5, **shape)


def build(
    name: str, settings: Settings, layers: int | None = None, tokenizer_dir: Path | None = None
) -> LoadedModel:
    """The shape `name` with random weights on GENQ_DEVICE, in GENQ_DTYPE (bf16 on a GPU that
    has it), initialised on the device itself; `layers` overrides its layer count (a smaller
    model of the same width)."""
    started = time.perf_counter()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    tok = tokenizer(settings, tokenizer_dir)
    model_config = config(name, len(tok), layers)
    model_config.bos_token_id = tok.bos_token_id
    model_config.eos_token_id = tok.eos_token_id
    model_config.pad_token_id = tok.pad_token_id
    with device:
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]  # untyped
            model_config, dtype=dtype, attn_implementation="sdpa"
        )
    model.eval()
    return LoadedModel(
        name=f"{name}@random",
        source=f"random weights, {name} shape",
        model=model,
        tokenizer=tok,
        device=device,
        dtype=dtype,
        eos_token_ids=frozenset({tok.eos_token_id}),
        max_context=model_config.max_position_embeddings,
        load_s=time.perf_counter() - started,
    )


@dataclass(frozen=True)
class Plan:
    """What `measure` runs."""

    concurrency: list[int]
    paths: tuple[str, ...] = ("static", "eager")
    # Concurrencies of the eager path, when fewer (it is slow on a GPU); None: all.
    eager_concurrency: list[int] | None = None
    sequential_requests: int = 4  # 3 at least: the first and the last are outside the window
    static_batch: bool = True
    hf_batch: int = 64  # requests of a wave of transformers' generate_batch; 0: skipped
    requests_per_row: int = 4
    variants: bool = False
    deadline: float = float("inf")  # time.monotonic() past which no part starts


@dataclass
class Figures:
    """What `measure` found so far; `on_part` sees it after every part."""

    data: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {**self.data, "errors": self.errors}


def measure(
    lm: LoadedModel,
    plan: Plan,
    say: Callable[[str], None],
    on_part: Callable[[Figures], None] = lambda _: None,
) -> dict[str, Any]:
    figures = Figures(
        {
            "shape": lm.source,
            "device": _device_name(lm.device),
            "dtype": str(lm.dtype),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "engine": {},
        }
    )
    sent = sum(max(8, plan.requests_per_row * c) for c in plan.concurrency)
    items = workload(lm, max(256, sent + plan.requests_per_row * VARIANT_CONCURRENCY * 2))
    say(f"{lm.source}: {lm.name} on {figures.data['device']} ({lm.dtype})")

    def part(name: str, run: Callable[[], None]) -> None:
        if time.monotonic() > plan.deadline:
            figures.errors[name] = "skipped: out of time"
            say(f"{name}: skipped, out of time")
        else:
            try:
                run()
            except Exception as e:
                figures.errors[name] = describe(e)
                say(f"{name} failed: {describe(e)}")
        on_part(figures)

    for path in plan.paths:
        in_flight = plan.concurrency
        if path == "eager" and plan.eager_concurrency is not None:
            in_flight = plan.eager_concurrency
        part(f"engine_{path}", partial(_engines, lm, items, plan, path, in_flight, figures, say))
    with torch.inference_mode():
        if plan.sequential_requests:
            part("sequential", lambda: _sequential(lm, items, plan, figures, say))
        if plan.static_batch:
            part("static_batch", lambda: _static_batch(lm, items, plan, figures, say))
    if plan.hf_batch:
        part("hf_generate_batch", lambda: _hf_generate_batch(lm, items, plan, figures, say))
    return figures.as_dict()


def _engines(
    lm: LoadedModel,
    items: list[Item],
    plan: Plan,
    path: str,
    in_flight: list[int],
    figures: Figures,
    say: Callable[[str], None],
) -> None:
    rows = max(in_flight)
    # No prefix cache: the systems it is compared with have none.
    limits = EngineLimits(
        max_batch_size=rows, max_batch_tokens=rows * TOKENS_PER_ROW, prefix_cache_bytes=0
    )
    started = time.perf_counter()
    driver = EngineDriver(lm, limits, PATHS[path])
    try:
        # The engine sets up on its thread (allocation, capture): a first request waits for it.
        closed_loop(driver, items, 1, total=1)
        mode = driver.engine.decode_mode
        found: dict[str, Any] = {
            "decode": mode.label if mode else None,
            "note": mode.note if mode else None,
            "setup_s": time.perf_counter() - started,
            "tok_s_by_concurrency": {},
        }
        figures.data["engine"][path] = found
        say(f"engine, {path} path: {found['decode']} ({found['note'] or 'as configured'}), ready")
        for c in in_flight:
            if time.monotonic() > plan.deadline:
                figures.errors[f"engine_{path}_{c}"] = "skipped: out of time"
                continue
            total = max(8, plan.requests_per_row * c)
            rate = closed_loop(driver, items, c, total).steady_tok_s
            found["tok_s_by_concurrency"][str(c)] = rate
            say(f"engine, {path:6}, {c:3d} in flight  {rate:9.1f} tok/s steady state")
    finally:
        driver.close()
        del driver
        _release(lm)
    if path == "static" and plan.variants and VARIANT_CONCURRENCY in in_flight:
        for name, change in VARIANTS.items():
            if time.monotonic() > plan.deadline:
                figures.errors[f"variant_{name}"] = "skipped: out of time"
                continue
            decode = replace(PATHS[path], **change)
            driver = EngineDriver(lm, replace(limits, max_batch_size=VARIANT_CONCURRENCY), decode)
            try:
                c = VARIANT_CONCURRENCY
                closed_loop(driver, items, 1, total=1)
                rate = closed_loop(driver, items, c, plan.requests_per_row * c).steady_tok_s
            finally:
                driver.close()
                del driver
                _release(lm)
            figures.data.setdefault("static_variants_at_64", {})[name] = rate
            say(f"engine, static, {name}, {c} in flight  {rate:9.1f} tok/s steady state")


def _sequential(
    lm: LoadedModel, items: list[Item], plan: Plan, figures: Figures, say: Callable[[str], None]
) -> None:
    rate = sequential(lm, items[: plan.sequential_requests]).steady_tok_s
    figures.data["sequential_tok_s"] = rate
    say(f"generate, one at a time   {rate:9.1f} tok/s")


def _static_batch(
    lm: LoadedModel, items: list[Item], plan: Plan, figures: Figures, say: Callable[[str], None]
) -> None:
    batch = min(64, max(plan.concurrency))
    rate = static_batch(lm, items[: 3 * batch], batch).steady_tok_s
    figures.data["static_batch_tok_s"] = rate
    figures.data["static_batch_requests"] = batch
    say(f"static batch of {batch:<3}       {rate:9.1f} tok/s")


def _hf_generate_batch(
    lm: LoadedModel, items: list[Item], plan: Plan, figures: Figures, say: Callable[[str], None]
) -> None:
    rate = hf_generate_batch(lm, items[: 3 * plan.hf_batch], plan.hf_batch).steady_tok_s
    _release(lm)
    figures.data["hf_generate_batch_tok_s"] = rate
    figures.data["hf_generate_batch_requests"] = plan.hf_batch
    say(f"HF generate_batch, {plan.hf_batch:<3}   {rate:9.1f} tok/s")


def _release(lm: LoadedModel) -> None:
    gc.collect()
    if lm.device.type == "cuda":
        torch.cuda.empty_cache()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)


def parameters(name: str, vocab_size: int) -> int:
    """The shape's parameter count, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config(name, vocab_size))  # type: ignore[no-untyped-call]
    return sum(p.numel() for p in model.parameters())
