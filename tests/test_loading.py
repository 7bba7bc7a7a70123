"""Model sources: GGUF files (converted once into a safetensors cache), directories, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.settings import Settings
from tests.procs import genq_env
from worker.loading import ModelLoadError, converted_checkpoint, load_model
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
