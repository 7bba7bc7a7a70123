"""The static path's decoder: its slots, its decode step per bucket (eager, compiled or
replayed as a CUDA graph), and the fallbacks that keep requests served when compile or graphs
fail.

A decode-only step pads the running rows to a rows bucket and reads a length bucket of columns;
its step function (`decode_step`) reads its inputs from the slot state's fixed buffers and
writes the logits into its buffer, so a CUDA graph captured per pair of buckets at start-up
replays every such step. A step that admits rows replays the decode rows' graph, then runs
the prompts in an eager pass of their own; with `fused_prefill` (and always without graphs), one
eager pass over the decode rows and the prompts.

Anything but a device error or an out-of-memory error raised by the compiled or captured step at
run time turns that feature off for good (said once in the log and in the mode) and the step
runs again eagerly: rows never fail for it. A pass that failed half way rewrites the same columns
when it runs again.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from worker.engine import fused
from worker.engine.config import DecodeConfig, DecodeMode, describe
from worker.engine.generation import is_device_error
from worker.engine.model import LoadedModel
from worker.engine.prefix_cache import PrefixHit
from worker.engine.rows import Row
from worker.engine.static import forward as static_forward
from worker.engine.static.batch import SlotState, StaticBatch
from worker.engine.static.cache import Geometry
from worker.engine.static.graphs import (
    DecodeFn,
    EagerRunner,
    Runner,
    batch_buckets,
    bucket,
    cuda_graph_runner,
    length_buckets,
)

logger = logging.getLogger(__name__)

# Rotary embeddings that rescale with the sequence seen (a host-side check of the positions at
# every pass): neither static shapes nor graphs.
_UNSUPPORTED_ROPE = ("dynamic", "longrope")


def unsupported(lm: LoadedModel) -> str | None:
    """Why the static path cannot serve `lm`, or None."""
    config = lm.model.config
    if not fused.supports(lm.model):
        return f"it covers {', '.join(sorted(fused.FUSED_MODEL_TYPES))}, not {config.model_type}"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if any(kind in str(rope) for kind in _UNSUPPORTED_ROPE):
        return f"its rotary embedding ({rope}) rescales with the sequence length"
    return None


class StaticDecoder:
    def __init__(self, lm: LoadedModel, geometry: Geometry, config: DecodeConfig) -> None:
        self.lm = lm
        self.config = config
        self.state = SlotState(lm, geometry)
        self.batch_buckets = config.batch_buckets or batch_buckets(geometry.slots)
        assert self.batch_buckets[-1] >= geometry.slots, "the buckets cover every slot"
        self.length_buckets = length_buckets(geometry.columns)
        self.graphs = False
        self.compiled = False
        self.notes: list[str] = []
        self._runner: Runner = EagerRunner(self.decode_step)
        self._live = 0  # what `state.live` holds

    @property
    def geometry(self) -> Geometry:
        return self.state.geometry

    @property
    def mode(self) -> DecodeMode:
        note = "; ".join(self.notes) or None
        return DecodeMode("static", cuda_graphs=self.graphs, compiled=self.compiled, note=note)

    def shapes(self) -> list[tuple[int, int]]:
        return [(rows, length) for rows in self.batch_buckets for length in self.length_buckets]

    def prepare(self) -> None:
        """Compile and capture every bucket's step, as configured and as far as it works."""
        config = self.config
        factory = config.graph_runner
        if factory is None and config.cuda_graphs and self.lm.device.type == "cuda":
            factory = cuda_graph_runner
        # While steps run for show, every row is padding: it writes the scratch column only.
        self._set_live(0)
        if self.lm.compile:
            compiled: DecodeFn = torch.compile(
                self.decode_step, dynamic=True, backend=config.compile_backend
            )
            if self._try_prepare(compiled, factory, "torch.compile"):
                self.compiled = True
                self.graphs = factory is not None
                return
        if factory is not None:
            self.graphs = self._try_prepare(self.decode_step, factory, "CUDA graphs")

    def _try_prepare(self, fn: DecodeFn, factory: Any, feature: str) -> bool:
        runner: Runner = EagerRunner(fn) if factory is None else factory(fn, self.lm.device)
        try:
            runner.prepare(self.shapes())
        except Exception as e:
            if is_device_error(e):
                raise
            self._off(feature, e, "at start-up")
            return False
        self._runner = runner
        return True

    def swap(self, lm: LoadedModel) -> None:
        """Decode with `lm` (the same architecture) from now on: graphs and compiled code hold
        the old weights, so they are made again."""
        self.lm = lm
        self._runner = EagerRunner(self.decode_step)
        if self.graphs or self.compiled:
            self.graphs = self.compiled = False
            self.prepare()

    def reset(self) -> None:
        self.state.reset()
        self._live = 0

    def prefill(
        self, rows: list[Row], hits: list[PrefixHit | None], running: StaticBatch | None
    ) -> StaticBatch:
        first = len(running) if running is not None else 0
        return StaticBatch.prefill(self.state, self.lm, rows, hits, first)

    def forward(self, running: StaticBatch | None, prefill: StaticBatch | None) -> torch.Tensor:
        """The next-token logits of the running rows, then the prefill rows (rows x vocab)."""
        if prefill is None:
            assert running is not None
            return self._decode(len(running), running.span)
        part = prefill.part
        assert part is not None, "a prefill batch before its pass"
        model, cache = self.lm.model, self.state.cache
        if running is None:
            return static_forward.forward(model, cache, None, part)
        if self.config.fused_prefill or not self.graphs:
            n = len(running)
            self._set_live(n)
            decode = self._decode_part(n, bucket(running.span, self.length_buckets))
            return static_forward.forward(model, cache, decode, part)
        decoded = self._decode(len(running), running.span)
        return torch.cat([decoded, static_forward.forward(model, cache, None, part)])

    def _decode(self, n: int, span: int) -> torch.Tensor:
        rows, length = bucket(n, self.batch_buckets), bucket(span, self.length_buckets)
        self._set_live(n)
        try:
            self._runner.run(rows, length)
        except Exception as e:
            if is_device_error(e) or isinstance(e, torch.OutOfMemoryError):
                raise
            feature = "CUDA graphs" if self.graphs else "torch.compile"
            self._off(feature, e, "at run time")
            self.graphs = self.compiled = False
            self._runner = EagerRunner(self.decode_step)
            self.decode_step(rows, length)
        return self.state.logits[:n]

    def decode_step(self, rows: int, length: int) -> None:
        """The decode step of a bucket: rows 0..rows-1, `length` columns (the `DecodeFn`)."""
        logits = static_forward.forward(
            self.lm.model, self.state.cache, self._decode_part(rows, length), None
        )
        self.state.logits[:rows] = logits

    def _decode_part(self, rows: int, length: int) -> static_forward.DecodePart:
        state = self.state
        positions = state.slots.all_positions[:rows]
        live = state.cache.rows_index[:rows] < state.live
        columns = torch.where(live, positions, state.cache.scratch)
        return static_forward.DecodePart(state.tokens[:rows], positions, columns, length)

    def _set_live(self, n: int) -> None:
        if n != self._live:
            self.state.live.fill_(n)
            self._live = n

    def _off(self, feature: str, error: Exception, when: str) -> None:
        note = f"{feature} failed {when}, decoding without: {describe(error)}"
        self.notes.append(note)
        logger.warning("%s (model %s)", note, self.lm.name, exc_info=error)
