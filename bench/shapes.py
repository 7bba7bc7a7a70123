"""Randomly initialised models of real shapes, so that the engine benchmark runs on any device
without downloading weights:

    python -m bench.engine --shape NAME [--layers N] [--concurrency 1,16,64,256] [--json]

The sizes are the published configurations'. Every shape uses the default model's tokenizer
(SmolLM2's, 49,152 tokens), so Llama-3-8B's shape has that vocabulary instead of its own 128,256.
On the workload of `bench.engine` (chat prompts, 16-128 new tokens, end-of-sequence ignored):
`model.generate` one request at a time (4 requests), one static batch (`generate` over as many
requests as the largest concurrency, at most 64), and the engine's closed loops in steady state
at each concurrency (4 x that many requests).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from bench.engine_workload import engine_closed_loop, sequential, static_batch, workload
from common.settings import Settings
from worker.loading import LoadedModel, converted_checkpoint, resolve_device, resolve_dtype
from worker.model_fetch import ensure_default_model

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


def tokenizer(settings: Settings) -> Any:
    checkpoint = converted_checkpoint(
        ensure_default_model(settings.model_cache_dir), settings.model_cache_dir
    )
    return AutoTokenizer.from_pretrained(checkpoint)


def config(name: str, vocab_size: int, layers: int | None = None) -> LlamaConfig:
    shape = dict(SHAPES[name])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    return LlamaConfig(vocab_size=vocab_size, rms_norm_eps=1e-5, **shape)


def build(name: str, settings: Settings, layers: int | None = None) -> LoadedModel:
    """The shape `name` with random weights on GENQ_DEVICE, in GENQ_DTYPE (bf16 on a GPU that
    has it); `layers` overrides its layer count (a smaller model of the same width)."""
    started = time.perf_counter()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    tok = tokenizer(settings)
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


def measure(lm: LoadedModel, concurrency: list[int], say: Callable[[str], None]) -> dict[str, Any]:
    items = workload(lm, max(256, 4 * max(concurrency)))
    say(f"{lm.source}: {lm.name} on {lm.device} ({lm.dtype})")
    with torch.inference_mode():
        seq = sequential(lm, items[:4])
        say(f"generate, one at a time   {seq:8.1f} tok/s")
        batch = min(64, max(concurrency))
        static = static_batch(lm, items[:batch])
        say(f"static batch of {batch:<3}       {static:8.1f} tok/s")
    engine: dict[str, float] = {}
    for c in concurrency:
        engine[str(c)] = engine_closed_loop(lm, items, c, total=max(8, 4 * c)).steady_tok_s
        say(f"engine, {c:3d} in flight     {engine[str(c)]:8.1f} tok/s steady state")
    return {
        "shape": lm.source,
        "device": str(lm.device),
        "dtype": str(lm.dtype),
        "sequential_tok_s": seq,
        "static_batch_tok_s": static,
        "engine_tok_s_by_concurrency": engine,
    }


def parameters(name: str, vocab_size: int) -> int:
    """The shape's parameter count, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config(name, vocab_size))  # type: ignore[no-untyped-call]
    return sum(p.numel() for p in model.parameters())
