"""Cold start of a worker's model, from the GGUF file and from the converted cache.

    python -m bench.startup [--json]

Each start is a fresh Python process that imports torch and transformers, loads the default
model and runs its warm-up forward pass: what a worker does before it reports ready. The first
start converts the GGUF file (de-quantizing it) into an empty cache directory; the second loads
the safetensors checkpoint that conversion left there (memory-mapped).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import orjson

from common.settings import Settings
from worker.model_fetch import ensure_default_model

CHILD = (
    "from common.settings import Settings\n"
    "from worker.loading import load_model\n"
    "load_model(Settings())\n"
    "print('ready', flush=True)\n"
)


def timed_start(env: dict[str, str]) -> float:
    """Seconds from spawning the process to its model being ready (not to its exit)."""
    started = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-c", CHILD],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as child:
        assert child.stdout is not None
        line = child.stdout.readline()
        ready_s = time.perf_counter() - started
    if line.strip() != "ready":
        raise RuntimeError(f"the model did not load (exit status {child.returncode})")
    return ready_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    gguf = ensure_default_model(Settings().model_cache_dir)
    with tempfile.TemporaryDirectory(prefix="genq-startup-") as cache:
        env = {**os.environ, "GENQ_MODEL": str(gguf), "GENQ_MODEL_CACHE_DIR": cache}
        gguf_s = timed_start(env)
        cache_s = timed_start(env)
    figures = {"gguf_start_s": gguf_s, "cache_start_s": cache_s, "ratio": cache_s / gguf_s}
    if args.json:
        print(orjson.dumps(figures).decode())
    else:
        print(f"from the GGUF file  {gguf_s:6.1f} s")
        print(f"from the cache      {cache_s:6.1f} s  ({cache_s / gguf_s:.0%} of the GGUF start)")


if __name__ == "__main__":
    main()
