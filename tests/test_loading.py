"""Model sources: GGUF files (converted once into a safetensors cache), directories, errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.mkldnn

from common.catalog import ModelSpec
from common.settings import Settings
from tests.procs import genq_env
from worker.engine.model import LoadedModel
from worker.loading import (
    ModelLoadError,
    converted_checkpoint,
    load_model,
    verify_checksums,
)
from worker.model_fetch import ensure_default_model


def test_gguf_is_converted_once_then_served_from_the_cache(tmp_path: Path) -> None:
    gguf = ensure_default_model(Settings().model_cache_dir)
    first = converted_checkpoint(gguf, tmp_path)
    marker = first / ".genq-complete"
    stamp = marker.stat().st_mtime_ns
    assert converted_checkpoint(gguf, tmp_path) == first
    assert marker.stat().st_mtime_ns == stamp  # not converted again
    assert (first / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((first / "config.json").read_text())
    lm = load_model(Settings(model=str(gguf), model_cache_dir=tmp_path, device="cpu"))
    assert lm.tokenizer.chat_template
    assert lm.eos_token_ids == {lm.tokenizer.convert_tokens_to_ids("<|im_end|>")}


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("/nowhere/model.gguf", "GGUF file not found"),
        ("./no-such-checkpoint", "not a checkpoint directory"),
    ],
)
def test_bad_sources_name_the_path_and_the_reason(tmp_path: Path, source: str, reason: str) -> None:
    with pytest.raises(ModelLoadError, match=reason) as err:
        load_model(Settings(model=source, model_cache_dir=tmp_path, device="cpu"))
    assert source in str(err.value)


def test_a_worker_whose_model_cannot_load_exits_with_the_reason(tmp_path: Path) -> None:
    env = genq_env("redis://127.0.0.1:1/0", GENQ_MODEL=str(tmp_path / "missing.gguf"))
    proc = subprocess.run(
        [sys.executable, "-m", "genq", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert "missing.gguf" in proc.stderr
    assert "GGUF file not found" in proc.stderr


def test_cpu_output_head_runs_on_onednn_and_matches_the_tied_embedding(
    tiny_lm: LoadedModel,
) -> None:
    head = tiny_lm.model.get_output_embeddings()
    assert isinstance(head, torch.utils.mkldnn.MkldnnLinear)
    hidden = torch.randn(3, 1, tiny_lm.model.config.hidden_size)
    embedding = tiny_lm.model.get_input_embeddings().weight
    with torch.inference_mode():
        torch.testing.assert_close(head(hidden), hidden @ embedding.T, rtol=1e-4, atol=1e-4)


def test_checksums_are_verified_before_loading(tiny_model_dir: Path) -> None:
    weights = tiny_model_dir / "model.safetensors"
    good = hashlib.sha256(weights.read_bytes()).hexdigest()
    source = str(tiny_model_dir)
    verify_checksums(ModelSpec(name="tiny", source=source, sha256={weights.name: good}), source)
    bad = ModelSpec(name="tiny", source=source, sha256={weights.name: "0" * 64})
    with pytest.raises(
        ModelLoadError, match=f"checksum mismatch for model.safetensors: expected 0+, got {good}"
    ):
        verify_checksums(bad, source)
    missing = ModelSpec(name="tiny", source=source, sha256={"nope.bin": good})
    with pytest.raises(
        ModelLoadError, match=r"nope\.bin, named in its sha256 checksums, does not exist"
    ):
        verify_checksums(missing, source)
