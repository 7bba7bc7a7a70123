"""An engine's configuration: its limits (`EngineLimits`), how it is asked to decode
(`DecodeConfig`, from the settings) and how it does (`DecodeMode`, shown in `/v1/models`), which
may be less, with the reason."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from worker.engine.static.graphs import RunnerFactory


@dataclass(frozen=True, slots=True)
class EngineLimits:
    max_batch_size: int = 32
    max_batch_tokens: int = 65_536  # KV-cache tokens the padded batch may hold at its peak
    max_prefill_tokens: int = 4_096  # padded prompt tokens prefilled in one step
    memory_limit_bytes: int = 0  # 0: off
    prefix_cache_bytes: int = 256 * 2**20  # 0: off


StaticSetting = Literal["auto", "on", "off"]


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    # The static decode path (preallocated slots, bucketed decode steps): "auto" on CUDA
    # devices for the architectures it covers, "on" on any device (the CPU too), "off" never.
    static: StaticSetting = "auto"
    cuda_graphs: bool = True  # replay each decode bucket as a CUDA graph (CUDA devices only)
    # The compiler torch.compile uses where the model asks for it (`LoadedModel.compile`): on
    # the static path it compiles the decode step, on the eager one the model's forward pass.
    compile_backend: str | Callable[..., Any] = "inductor"
    # With the static path on CUDA, size the cache from this fraction of the device's memory
    # instead of GENQ_MAX_BATCH_TOKENS; 0: off.
    gpu_memory_fraction: float = 0.0
    # Decode steps a waiting request may wait for its prefill while rows decode with graphs,
    # so that one eager prefill serves several requests (TGI's max_waiting_tokens).
    prefill_wait_steps: int = 4
    # With CUDA graphs, prefill admitted prompts in the decode step's pass (one eager pass over
    # every row) instead of in a pass of their own after the graph replay. Off: on an H100 the
    # separate pass gave 13-19% more tokens/s at 64 in flight (docs/benchmarks.md). Without
    # graphs the prompts always join the decode rows' pass.
    fused_prefill: bool = False
    # Rows buckets of the decode step; None: 1, 2, 4, ... and the batch size.
    batch_buckets: tuple[int, ...] | None = None
    # What runs the buckets' decode steps instead of CUDA graphs (tests inject failing ones).
    graph_runner: RunnerFactory | None = None


Path = Literal["static", "eager"]


@dataclass(frozen=True, slots=True)
class DecodeMode:
    path: Path
    cuda_graphs: bool = False
    compiled: bool = False
    # Why it decodes otherwise than asked (a fallback); None when it runs as configured.
    note: str | None = None

    @property
    def label(self) -> str:
        """`cuda_graphs`, `static` or `eager`, `+compiled` when torch.compile'd."""
        name = "cuda_graphs" if self.cuda_graphs else self.path
        return f"{name}+compiled" if self.compiled else name


def describe(error: BaseException) -> str:
    """An error in a line, for notes: compilers' messages run to pages."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text[:300]}"
