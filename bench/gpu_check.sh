#!/usr/bin/env bash
# The GPU check of the static decode path (bench/gpu_check.py), as run on a lent GPU machine that
# has python3.12 and a CUDA torch but not this repository's other dependencies: the wheels in
# .gpu/wheels go into a directory of their own, ahead of the machine's packages, and the
# tokenizer comes from .gpu/tokenizer (both written by `python -m bench.gpu_check --prepare .gpu`
# and the pip download command it prints). Results go to $OUT.
set -u
cd "$(dirname "$0")/.."
site=/tmp/genq-site
if compgen -G ".gpu/wheels/*.whl" > /dev/null; then
    python3 -m pip install --quiet --no-index --no-deps --target "$site" .gpu/wheels/*.whl
fi
export PYTHONPATH="$site:$PWD"
exec python3 -m bench.gpu_check --out "${OUT:-gpu-out}" --budget-s "${GPU_CHECK_BUDGET_S:-450}" "$@"
