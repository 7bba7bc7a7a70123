"""Checks of the static decode path on a tiny model, for any device: `tests/test_static_decode.py`
runs them on the CPU (the decode step eager, or through an injected runner), `bench/gpu_check.py`
on a GPU with CUDA graphs. Each raises AssertionError with what differed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from tests.engine_driver import PROMPTS, SHARED_START, Collector, Job, greedy, reference, run
from worker.engine import EngineLimits
from worker.engine.config import DecodeConfig, DecodeMode
from worker.engine.model import LoadedModel
from worker.engine.sampling import SamplingParams
from worker.engine.static.graphs import DecodeFn, EagerRunner, Runner, RunnerFactory

# 8 slots of 384 tokens: rows buckets 1, 2, 4, 8 and length buckets 128, 256, 384.
LIMITS = EngineLimits(max_batch_size=8, max_batch_tokens=8 * 384)
# A prompt past the first length bucket: its row decodes in the second, then the third.
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)


def mixed_jobs(new_tokens: int = 16) -> list[Job]:
    """Rows of different lengths, admitted at different steps (some together), two starting
    alike (a prefix-cache hit), one past the first length bucket."""
    return [
        Job("a", PROMPTS[0], greedy(new_tokens)),
        Job("b", PROMPTS[1], greedy(new_tokens + 4)),
        Job("c", SHARED_START + "What is the capital of France?", greedy(new_tokens), at_step=2),
        Job("d", PROMPTS[2], greedy(new_tokens - 4), at_step=2),
        Job("e", SHARED_START + "Tell me about the fox.", greedy(new_tokens), at_step=5),
        Job("long", LONG_PROMPT, greedy(new_tokens + 24), at_step=6),
    ]


def seeded_jobs() -> list[Job]:
    def sampled(seed: int, **kwargs: float) -> SamplingParams:
        return SamplingParams(max_new_tokens=20, seed=seed, **kwargs)  # type: ignore[arg-type]

    mix = [
        greedy(20),
        sampled(1, temperature=0.7),
        sampled(2, temperature=1.0, top_k=5),
        sampled(3, temperature=0.9, top_p=0.8),
        sampled(4, temperature=1.2, top_k=20, top_p=0.9),
    ]
    return [Job(f"s{i}", PROMPTS[i % 3], p, at_step=i % 2) for i, p in enumerate(mix)]


def tokens(out: Collector) -> dict[str, list[int]]:
    assert not out.errors, f"requests failed: {out.errors}"
    return {job_id: generation.token_ids for job_id, generation in out.done.items()}


def mode_of(out: Collector) -> DecodeMode:
    assert out.mode is not None, "the engine never set up"
    return out.mode


def check_greedy_equals_generate(lm: LoadedModel, decode: DecodeConfig) -> None:
    out = run(lm, mixed_jobs(), LIMITS, decode=decode)
    assert mode_of(out).path == "static", out.mode
    got = tokens(out)
    for job in mixed_jobs():
        expected = reference(lm, job.prompt, job.params.max_new_tokens)
        assert got[job.id] == expected, f"{job.id}: {got[job.id]} != generate's {expected}"


def check_padding_never_changes_a_row(lm: LoadedModel, decode: DecodeConfig) -> None:
    """The same rows give the same tokens whether each step is padded to the next power of two
    or always to all 8 slots, and a row alone (1 row, no padding) gives its tokens too: greedy
    and seeded sampled rows alike."""
    jobs = [*mixed_jobs(), *seeded_jobs()]
    limits = replace(LIMITS, max_batch_size=16, max_batch_tokens=16 * 384)
    tight = tokens(run(lm, jobs, limits, decode=decode))
    padded = tokens(run(lm, jobs, limits, decode=replace(decode, batch_buckets=(16,))))
    assert tight == padded, "padding to a larger bucket changed some row"
    for job in jobs[::3]:
        alone = tokens(run(lm, [replace(job, at_step=0)], limits, decode=decode))
        assert alone[job.id] == tight[job.id], f"{job.id} alone differs from {job.id} in a batch"


def check_seeded_rows_alone_and_in_a_batch(lm: LoadedModel, decode: DecodeConfig) -> None:
    jobs = seeded_jobs()
    together = tokens(run(lm, jobs, LIMITS, decode=decode))
    for job in jobs:
        alone = tokens(run(lm, [replace(job, at_step=0)], LIMITS, decode=decode))
        assert alone[job.id] == together[job.id], job.id
    eager = tokens(run(lm, jobs, LIMITS, decode=replace(decode, static="off")))
    assert eager == together, "the static path samples other tokens than the eager one"


@dataclass
class Recording:
    """A runner factory around another that notes every shape it runs and can fail: at
    `prepare`, or at the `fail_at`-th run and every one after it (RuntimeError)."""

    base: RunnerFactory
    fail_at_prepare: bool = False
    fail_at: int | None = None
    runs: list[tuple[int, int]] = field(default_factory=list)

    def __call__(self, fn: DecodeFn, device: torch.device) -> Runner:
        return _Recorded(self, self.base(fn, device))


@dataclass
class _Recorded:
    owner: Recording
    inner: Runner

    def prepare(self, shapes: Sequence[tuple[int, int]]) -> None:
        if self.owner.fail_at_prepare:
            raise RuntimeError("capture failed (injected)")
        self.inner.prepare(shapes)

    def run(self, rows: int, length: int) -> None:
        self.owner.runs.append((rows, length))
        fail_at = self.owner.fail_at
        if fail_at is not None and len(self.owner.runs) >= fail_at:
            raise RuntimeError("graph replay failed (injected)")
        self.inner.run(rows, length)


def eager_runner(fn: DecodeFn, device: torch.device) -> Runner:
    del device
    return EagerRunner(fn)


def check_decode_steps_go_through_the_runner(lm: LoadedModel, base: RunnerFactory) -> None:
    """Decode-only steps run the bucket's runner (graph), at a bucket that holds the rows; a
    step that admits rows runs eagerly; both prefill modes give generate's tokens."""
    for fused in (True, False):
        recording = Recording(base)
        decode = DecodeConfig(static="on", graph_runner=recording, fused_prefill=fused)
        out = run(lm, mixed_jobs(), LIMITS, decode=decode)
        assert mode_of(out).cuda_graphs, out.mode
        got = tokens(out)
        for job in mixed_jobs():
            assert got[job.id] == reference(lm, job.prompt, job.params.max_new_tokens), job.id
        assert recording.runs, "no decode step used the runner"
        assert {rows for rows, _ in recording.runs} <= {1, 2, 4, 8}
        assert {length for _, length in recording.runs} >= {128, 256}


def check_a_runner_failing_at_run_time_fails_no_request(
    lm: LoadedModel, base: RunnerFactory
) -> None:
    recording = Recording(base, fail_at=3)
    decode = DecodeConfig(static="on", graph_runner=recording)
    out = run(lm, mixed_jobs(), LIMITS, decode=decode)
    got = tokens(out)
    for job in mixed_jobs():
        assert got[job.id] == reference(lm, job.prompt, job.params.max_new_tokens), job.id
    assert len(recording.runs) == 3, "the failed runner was used again"
    assert not mode_of(out).cuda_graphs
    assert "failed at run time" in (mode_of(out).note or ""), out.mode


def check_a_runner_failing_at_start_up_fails_no_request(
    lm: LoadedModel, base: RunnerFactory
) -> None:
    recording = Recording(base, fail_at_prepare=True)
    decode = DecodeConfig(static="on", graph_runner=recording)
    out = run(lm, mixed_jobs(), LIMITS, decode=decode)
    got = tokens(out)
    for job in mixed_jobs():
        assert got[job.id] == reference(lm, job.prompt, job.params.max_new_tokens), job.id
    assert not recording.runs
    assert mode_of(out).path == "static"
    assert not mode_of(out).cuda_graphs
    assert "failed at start-up" in (mode_of(out).note or ""), out.mode
