"""The GPU check of the static decode path, in one run of about 8 minutes on an H100 or H200:

    bash bench/gpu_check.sh               # installs .gpu/wheels, then runs this with $OUT
    python -m bench.gpu_check --out DIR [--tokenizer DIR] [--budget-s 450] [--smoke]
    python -m bench.gpu_check --prepare .gpu     # on a machine with the model cache: the tokenizer

Parts, each in a process of its own (a CUDA error is sticky: it must not take the other parts
with it), each with its share of the time budget, and a part that finishes early leaves its time
to the next:

1. `tests` (~100 s): the static path's checks with CUDA graphs on a tiny model
   (`bench/gpu_tests.py`);
2. `smollm2-135m` (~75 s), `smollm2-1.7b` (~100 s), `llama3-8b` (~165 s): `bench.engine --shape`
   in bf16 at 1, 16, 64 and 256 in flight, the static path and the eager one (the 8B eager at 1,
   16 and 64), against `model.generate` one request at a time and transformers'
   `generate_batch` at 64; for 1.7B and 8B also the static path at 64 with the prompts in a pass
   of their own and with no prefill wait.

A part stops starting measurements shortly before its share runs out and is killed if it
overruns; what it measured until then is already in its JSON file. Under `--out`: `gpu_check.log`
(everything the parts printed), `tests.json`, one JSON per shape and `summary.json` (the figures,
ratios and targets), whose short form is printed at the end. `--smoke` runs the same on a
2-layer model of each shape at 1 and 4 in flight, on whatever device is present (to check the
script itself).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG = "gpu_check.log"
# The smallest share a later part keeps, whatever earlier ones overran.
MIN_SHARE_S = 40.0
# What the GPU machine needs beside its torch and numpy (python 3.12, manylinux x86_64): this
# repository's transformers and everything the check imports, at versions tested together.
WHEELS = [
    "transformers==5.24.0",
    "huggingface_hub==2.4.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "accelerate==1.15.0",
    "regex==2026.11.19",
    "tqdm==4.70.1",
    "packaging==25.0",
    "filelock==4.3.1",
    "PyYAML==6.0.4",
    "httpx2==2.16.2",
    "httpcore2==2.16.2",
    "anyio==4.16.0",
    "h11==0.16.0",
    "idna==3.20",
    "sniffio==1.3.1",
    "truststore==0.10.5",
    "certifi==2026.10.19.post1",
    "typing_extensions==4.16.0",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "pydantic-settings==2.16.3",
    "typing-inspection==0.4.5",
    "annotated-types==0.8.0",
    "python-dotenv==1.2.4",
    "orjson==3.13.0",
    "msgpack==1.2.4",
    "prometheus_client==0.26.0",
    "psutil==7.2.2",
]


@dataclass(frozen=True)
class Part:
    name: str
    share_s: float
    margin_s: float  # stop starting measurements this long before the share runs out
    args: tuple[str, ...] = ()


COMMON = ["--concurrency", "1,16,64,256", "--requests-per-row", "3", "--no-static-batch"]
PARTS = [
    Part("tests", 100, 20),
    Part("smollm2-135m", 75, 25, (*COMMON, "--sequential", "4")),
    Part("smollm2-1.7b", 100, 30, (*COMMON, "--sequential", "3", "--variants")),
    Part(
        "llama3-8b",
        165,
        45,
        (*COMMON, "--sequential", "3", "--variants", "--eager-concurrency", "1,16,64"),
    ),
]
SMOKE_ARGS = tuple(
    [
        "--layers",
        "2",
        "--concurrency",
        "1,4",
        "--sequential",
        "3",
        "--requests-per-row",
        "3",
        "--hf-batch",
        "4",
        "--no-static-batch",
    ]
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: .gpu/tokenizer")
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--smoke", action="store_true", help="2-layer shapes, 1 and 4 in flight")
    parser.add_argument("--prepare", type=Path, default=None, help="write the tokenizer there")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deadline-s", type=float, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.tokenizer is None and Path(".gpu/tokenizer").is_dir():
        args.tokenizer = Path(".gpu/tokenizer")
    if args.prepare is not None:
        prepare(args.prepare)
    elif args.part is not None:
        run_part(args.part, args.out, args.tokenizer, time.monotonic() + args.deadline_s, rest)
    else:
        orchestrate(args.out, args.tokenizer, args.budget_s, args.smoke)


def orchestrate(out: Path, tokenizer: Path | None, budget_s: float, smoke: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    log = out / LOG
    started = time.monotonic()
    end = started + budget_s
    say = _sayer(log)
    say(environment())
    outcomes: dict[str, str] = {}
    for index, part in enumerate(PARTS):
        later = MIN_SHARE_S * (len(PARTS) - index - 1)
        kill_at = min(
            end - later, time.monotonic() + part.share_s + _unused(PARTS[:index], started)
        )
        kill_at = max(kill_at, time.monotonic() + MIN_SHARE_S)
        deadline_s = max(kill_at - time.monotonic() - part.margin_s, 5.0)
        args = SMOKE_ARGS if smoke and part.name != "tests" else part.args
        command = [
            sys.executable, "-m", "bench.gpu_check", "--part", part.name, "--out", str(out),
            "--deadline-s", f"{deadline_s:.0f}", *args,
        ]  # fmt: skip
        if tokenizer is not None:
            command += ["--tokenizer", str(tokenizer)]
        say(f"== {part.name}: {kill_at - time.monotonic():.0f} s at most")
        outcomes[part.name] = _run(command, kill_at - time.monotonic(), log)
        say(f"== {part.name}: {outcomes[part.name]} after {time.monotonic() - started:.0f} s")
    summary = summarise(out, outcomes, time.monotonic() - started)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    say(render(summary))


def _unused(done: list[Part], started: float) -> float:
    """Time the parts so far left of their shares (negative when they overran)."""
    return sum(p.share_s for p in done) - (time.monotonic() - started)


def _run(command: list[str], timeout_s: float, log: Path) -> str:
    with log.open("a") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return f"killed at its time limit ({timeout_s:.0f} s)"
    return "ok" if code == 0 else f"exit status {code}"


def _sayer(log: Path) -> Any:
    def say(text: str) -> None:
        print(text, flush=True)
        with log.open("a") as sink:
            sink.write(text + "\n")

    return say


def environment() -> str:
    import torch
    import transformers

    lines = [
        f"python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    ]
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        lines.append(
            f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), "
            f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free"
        )
    else:
        lines.append("no CUDA device: everything runs on the CPU")
    if not transformers.__version__.startswith("5.24"):
        lines.append("WARNING: this repository pins transformers 5.24 (see bench/gpu_check.sh)")
    return "\n".join(lines)


def run_part(
    name: str, out: Path, tokenizer: Path | None, deadline: float, rest: list[str]
) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    target = out / f"{name}.json"

    def say(text: str) -> None:
        print(text, flush=True)  # into the log: the orchestrator sends a part's output there

    def write(found: dict[str, Any]) -> None:
        target.write_text(json.dumps(found, indent=2))

    if name == "tests":
        from bench import gpu_tests

        gpu_tests.run_all(deadline, tokenizer, say, write)
        return
    from bench import shapes
    from bench.engine import shape_plan, shapes_options
    from common.settings import Settings

    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--layers", type=int, default=None)
    shapes_options(parser)
    args = parser.parse_args(rest)
    started = time.perf_counter()
    lm = shapes.build(name, Settings(dtype="auto"), layers=args.layers, tokenizer_dir=tokenizer)
    say(f"built {name} in {time.perf_counter() - started:.1f} s")
    plan = shape_plan(args, deadline)
    figures = shapes.measure(lm, plan, say, lambda found: write(found.as_dict()))
    figures["build_s"] = time.perf_counter() - started
    write(figures)


# Targets of issue 17, on an H100 or H200 in bf16: (shape, path of the figure, at least).
TARGETS = [
    ("llama3-8b", "static@1", 150.0),
    ("llama3-8b", "static@64", 5_000.0),
    ("smollm2-1.7b", "static@256", 20_000.0),
]
TARGET_RATIO_TO_HF = 3.0


def summarise(out: Path, outcomes: dict[str, str], elapsed_s: float) -> dict[str, Any]:
    summary: dict[str, Any] = {"elapsed_s": round(elapsed_s), "parts": outcomes, "shapes": {}}
    tests = out / "tests.json"
    summary["tests"] = json.loads(tests.read_text()) if tests.exists() else {}
    for part in PARTS[1:]:
        path = out / f"{part.name}.json"
        if not path.exists():
            continue
        found = json.loads(path.read_text())
        row: dict[str, Any] = {
            "device": found.get("device"),
            "sequential": found.get("sequential_tok_s"),
            "hf_generate_batch_64": found.get("hf_generate_batch_tok_s"),
            "errors": found.get("errors", {}),
        }
        for path_name, engine in found.get("engine", {}).items():
            row[f"{path_name}_decode"] = engine.get("decode")
            if engine.get("note"):
                row[f"{path_name}_note"] = engine["note"]
            for c, rate in engine.get("tok_s_by_concurrency", {}).items():
                row[f"{path_name}@{c}"] = rate
        row.update(
            {f"variant_{k}@64": v for k, v in found.get("static_variants_at_64", {}).items()}
        )
        hf = row.get("hf_generate_batch_64")
        if hf and row.get("static@64"):
            row["static@64_over_hf"] = row["static@64"] / hf
        summary["shapes"][part.name] = row
    summary["targets"] = targets(summary["shapes"])
    return summary


def targets(shapes: dict[str, Any]) -> list[str]:
    lines = []
    for shape, figure, least in TARGETS:
        value = shapes.get(shape, {}).get(figure)
        lines.append(_verdict(f"{shape} {figure} >= {least:,.0f} tok/s", value, least))
    for shape, row in shapes.items():
        ratio = row.get("static@64_over_hf")
        least = TARGET_RATIO_TO_HF
        lines.append(_verdict(f"{shape} static@64 >= {least:.0f} x generate_batch", ratio, least))
    return lines


def _verdict(what: str, value: float | None, least: float) -> str:
    if value is None:
        return f"NOT MEASURED  {what}"
    return f"{'MET' if value >= least else 'MISSED':12}  {what}: {value:,.2f}"


def render(summary: dict[str, Any]) -> str:
    lines = [f"== summary ({summary['elapsed_s']} s)", f"parts: {summary['parts']}"]
    lines += [f"test {k}: {v}" for k, v in summary["tests"].items() if not k.endswith("_s")]
    for shape, row in summary["shapes"].items():
        figures = ", ".join(
            f"{k} {v:,.0f}" if isinstance(v, float) and k != "static@64_over_hf" else f"{k} {v}"
            for k, v in row.items()
            if k not in ("errors", "device") and v is not None
        )
        lines.append(f"{shape} on {row['device']}: {figures}")
        if row["errors"]:
            lines.append(f"  errors: {row['errors']}")
    lines += summary["targets"]
    return "\n".join(lines)


def prepare(where: Path) -> None:
    """The tokenizer the shapes use, from this machine's model cache, into `where`/tokenizer;
    and the command that fetches the wheels the GPU machine lacks into `where`/wheels."""
    from bench.shapes import tokenizer
    from common.settings import Settings

    target = where / "tokenizer"
    shutil.rmtree(target, ignore_errors=True)
    tokenizer(Settings()).save_pretrained(target)
    print(f"tokenizer saved in {target}")
    print(
        "wheels: pip download --no-deps --only-binary=:all: --python-version 3.12 "
        f"--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d {where / 'wheels'} "
        + " ".join(WHEELS)
    )


if __name__ == "__main__":
    main()
