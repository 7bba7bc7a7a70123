"""Load a causal LM and its tokenizer from a checkpoint directory, a GGUF file or a hub id."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.utils.mkldnn
from huggingface_hub import hf_hub_download
from safetensors.torch import save_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    PreTrainedTokenizerBase,
)
from transformers.cache_utils import DynamicSlidingWindowLayer

from common.catalog import ModelSpec, builtin_catalog
from common.settings import Settings
from worker.engine.model import LoadedModel
from worker.model_fetch import ensure_default_model

logger = logging.getLogger(__name__)

_COMPLETE = ".genq-complete"


class ModelLoadError(RuntimeError):
    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"cannot load model {source!r}: {reason}")
        self.source = source
        self.reason = reason


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("-", "GENQ_DEVICE=cuda but no CUDA device is visible")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)  # type: ignore[no-any-return]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _checkpoint(source: str, cache_dir: Path) -> str:
    """What from_pretrained loads for a source: a directory, or a hub id.

    A GGUF file is de-quantized once into a safetensors checkpoint in the cache, keyed by the
    file's checksum; later starts load that (memory-mapped) instead of converting again.
    """
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(source, "GGUF file not found")
        return str(converted_checkpoint(path, cache_dir))
    if path.is_dir():
        return str(path)
    if path.exists() or source.startswith((".", "/", "~")):
        raise ModelLoadError(source, "not a checkpoint directory or a .gguf file")
    return source  # a hub id


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def converted_checkpoint(gguf: Path, cache_dir: Path) -> Path:
    target = cache_dir / "converted" / f"{gguf.stem}-{_sha256(gguf)[:16]}"
    if (target / _COMPLETE).is_file():
        return target
    logger.info("converting %s into %s (once)", gguf, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(str(gguf), str(e)) from e
    # Written aside and renamed, so a crash never leaves a half checkpoint that looks whole.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # The weights are de-quantized now: the GGUF quantization settings no longer apply.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(partial)
    model.generation_config.save_pretrained(partial)
    save_model(model, str(partial / "model.safetensors"))  # handles tied embeddings
    tokenizer.save_pretrained(partial)
    (partial / _COMPLETE).write_text(str(gguf))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def _eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    for value in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    return frozenset(ids)


def _warm_up(model: Any, device: torch.device) -> None:
    """One forward pass, so the first request does not pay for lazy initialisation."""
    with torch.inference_mode():
        model(input_ids=torch.zeros((1, 4), dtype=torch.long, device=device))


def _use_onednn_output_head(model: Any) -> None:
    """On CPU in fp32, run the LM head through oneDNN instead of MKL's GEMM.

    With a large vocabulary and few rows (decoding), MKL re-packs the whole head weight on every
    call: for SmolLM2 at 16 rows, oneDNN's pre-packed weight takes 17 ms where MKL takes 36 ms,
    and the head is a quarter of a decode step. The other layers gain nothing, so only the head
    is swapped (its tied input embedding stays a plain tensor).
    """
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear) and torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        model.set_output_embeddings(torch.utils.mkldnn.MkldnnLinear(head, torch.float32))


def _sliding_window(model: Any) -> int | None:
    """The smallest window of the model's sliding-window attention layers, if it has any.

    The batching engine keeps every layer's whole cache, which is exact for such a layer only
    while a sequence fits its window: the window caps the context (Mistral-7B-v0.1 serves 4,096
    tokens, not 32,768), rather than the model being refused.
    """
    windows = [
        layer.sliding_window
        for layer in DynamicCache(config=model.config).layers
        if isinstance(layer, DynamicSlidingWindowLayer)
    ]
    return min(windows, default=None)


def source_path(spec: ModelSpec, settings: Settings) -> str:
    """The spec's source, the default model's GGUF file (fetched once) when it names none."""
    return spec.source or str(ensure_default_model(settings.model_cache_dir))


def verify_checksums(spec: ModelSpec, source: str) -> None:
    """Refuse weights whose SHA-256 differs from the catalog's (a truncated copy, the wrong
    file, tampering). Paths are relative to the checkpoint directory, or to a GGUF file's."""
    if not spec.sha256:
        return
    path = Path(source).expanduser()
    root = path.parent if path.suffix == ".gguf" else path
    for name, expected in spec.sha256.items():
        file = root / name
        if not root.is_dir():
            file = Path(_hub_file(source, name))
        if not file.is_file():
            raise ModelLoadError(source, f"{name}, named in its sha256 checksums, does not exist")
        actual = _sha256(file)
        if actual != expected.lower():
            raise ModelLoadError(
                source, f"checksum mismatch for {name}: expected {expected}, got {actual}"
            )


def _hub_file(repo_id: str, name: str) -> str:
    try:
        return str(hf_hub_download(repo_id, name))
    except (OSError, ValueError) as e:
        raise ModelLoadError(repo_id, f"cannot fetch {name} to check its checksum: {e}") from e


def estimated_bytes(spec: ModelSpec, settings: Settings) -> int:
    """Memory the spec's weights will take, from its checkpoint files, before loading them
    (0 for a hub id not downloaded yet). Converts a GGUF source first, as loading would."""
    where = Path(_checkpoint(source_path(spec, settings), settings.model_cache_dir))
    if not where.is_dir():
        return 0
    stored = sum(f.stat().st_size for f in where.glob("*.safetensors"))
    stored += sum(f.stat().st_size for f in where.glob("*.bin"))
    config = AutoConfig.from_pretrained(where)
    saved_as = getattr(config, "dtype", None) or torch.float32
    if isinstance(saved_as, str):
        saved_as = getattr(torch, saved_as, torch.float32)
    target = resolve_dtype(
        spec.dtype or settings.dtype, resolve_device(spec.device or settings.device)
    )
    return stored * target.itemsize // saved_as.itemsize


def load_model(settings: Settings) -> LoadedModel:
    """The model of GENQ_MODEL (or the default model) with the worker's settings."""
    return load_spec(
        builtin_catalog(settings).default_version(settings.served_model_name), settings
    )


def load_spec(spec: ModelSpec, settings: Settings) -> LoadedModel:
    source = source_path(spec, settings)
    device = resolve_device(spec.device or settings.device)
    dtype = resolve_dtype(spec.dtype or settings.dtype, device)
    started = time.perf_counter()
    verify_checksums(spec, source)
    where = _checkpoint(source, settings.model_cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
        model: Any = AutoModelForCausalLM.from_pretrained(
            where, dtype=dtype, attn_implementation="sdpa"
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(source, str(e)) from e
    model = model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device.type == "cpu" and dtype == torch.float32:
        _use_onednn_output_head(model)
    _warm_up(model, device)
    positions = int(getattr(model.config, "max_position_embeddings", 2048))
    window = _sliding_window(model)
    loaded = LoadedModel(
        name=spec.key,
        source=source,
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        eos_token_ids=_eos_ids(model, tokenizer),
        max_context=min(positions, window or positions),
        load_s=time.perf_counter() - started,
        max_prompt_tokens=spec.max_prompt_tokens,
        compile=settings.compile if spec.compile is None else spec.compile,
        sliding_window=window if window and window < positions else None,
    )
    logger.info(
        "loaded model %s from %s on %s (%s) in %.1fs",
        loaded.name,
        source,
        device,
        dtype,
        loaded.load_s,
    )
    return loaded
