"""The models one worker holds: loaded when a job first needs them, kept within a memory budget
(the least recently used idle model goes first), reloaded in the background and swapped in
between decode steps. Each held model has its own engine thread."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from common.catalog import CatalogSource, EngineSpec, ModelSpec, UnknownModel
from common.contract import ErrorCode
from common.heartbeats import HeldModelInfo, ModelState
from common.settings import Settings
from worker import metrics
from worker.engine import DecodeConfig, Engine, EngineLimits, GenerationError, StepCallback
from worker.engine.model import LoadedModel
from worker.loading import ModelLoadError, estimated_bytes, load_spec
from worker.model_fetch import ModelFetchError

logger = logging.getLogger(__name__)

# Configuration a swapped-in model must share with the one it replaces: rows in flight keep
# their KV cache and token ids across the swap.
_SWAP_INVARIANTS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
_LOAD_ERRORS = (ModelLoadError, ModelFetchError, GenerationError, OSError)


class ModelUnavailable(GenerationError):
    code = ErrorCode.model_unavailable


@dataclass(eq=False)
class HeldModel:
    """A model version this worker holds: its weights and engine once loaded, its state and its
    use; `info()` is what the heartbeat tells of it."""

    spec: ModelSpec
    state: ModelState = "loading"
    reason: str | None = None
    lm: LoadedModel | None = None
    engine: Engine | None = None
    engine_metrics: metrics.EngineMetrics | None = None  # its engine's step series
    bytes: int = 0
    in_flight: int = 0
    last_used: float = field(default_factory=time.monotonic)
    loaded_at: float | None = None
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # loaded, or failed to

    def info(self) -> HeldModelInfo:
        mode = self.engine.decode_mode if self.engine is not None else None
        return HeldModelInfo(
            key=self.spec.key,
            state=self.state,
            reason=self.reason,
            loaded_at=self.loaded_at,
            bytes=self.bytes,
            decode=mode.label if mode is not None else None,
            decode_note=mode.note if mode is not None else None,
            max_context=self.lm.max_context if self.lm is not None else None,
        )

    @property
    def idle(self) -> bool:
        return self.state == "ready" and self.in_flight == 0


def swappable(old: LoadedModel, new: LoadedModel) -> bool:
    a, b = old.model.config, new.model.config
    return (
        all(getattr(a, k, None) == getattr(b, k, None) for k in _SWAP_INVARIANTS)
        and old.device == new.device
        and old.dtype == new.dtype
        and old.tokenizer.get_vocab() == new.tokenizer.get_vocab()
    )


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        source: CatalogSource,
        on_step: StepCallback,
        on_change: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.source = source
        self.on_step = on_step
        self.on_change = on_change  # a model's state changed: heartbeat now
        self._held: dict[str, HeldModel] = {}
        self._retiring: list[HeldModel] = []  # replaced, finishing their rows
        # Versions a reload is bringing in: their jobs wait for it rather than load them again.
        self._incoming: dict[str, asyncio.Event] = {}
        self._loading = asyncio.Lock()  # one load (and its evictions) at a time
        self._released = asyncio.Event()
        self._budget = int(settings.model_memory_budget_mb * 2**20)

    def holdings(self) -> list[HeldModelInfo]:
        """What the heartbeat tells of each model version held here."""
        return [held.info() for held in self._held.values()]

    def engines(self) -> list[Engine]:
        """Every engine thread this worker runs, retiring ones included."""
        held = [*self._held.values(), *self._retiring]
        return [h.engine for h in held if h.engine is not None]

    def preload(self) -> None:
        """Load the pool's `preload` models before the worker takes jobs (engines start with
        `start`). Raises if there were some and none loaded: the worker cannot serve."""
        specs = [
            s
            for s in self.source.get().specs.values()
            if s.pool == self.settings.pool and s.preload
        ]
        failures = []
        for spec in specs:
            held = HeldModel(spec)
            self._held[spec.key] = held
            try:
                self._install(held, load_spec(spec, self.settings), start=False)
            except _LOAD_ERRORS as e:
                self._fail(held, str(e))
                failures.append(str(e))
        if specs and len(failures) == len(specs):
            raise ModelLoadError(", ".join(s.key for s in specs), "; ".join(failures))

    def start(self) -> None:
        for held in self._held.values():
            if held.engine is not None:
                held.engine.start()

    async def stop(self) -> None:
        for held in [*self._held.values(), *self._retiring]:
            if held.engine is not None:
                await asyncio.to_thread(held.engine.stop)

    def spec_for(self, key: str, requested: str | None) -> ModelSpec:
        """The catalog entry to run a job with. A job queued for a version that a reload has
        since removed runs on what its requested name serves now."""
        catalog = self.source.get()
        if key not in catalog.specs:  # a reload this worker has not heard of yet?
            catalog = self.source.get(force=True)
        spec = catalog.specs.get(key)
        if spec is None:
            try:
                spec = catalog.resolve(requested)
            except UnknownModel as e:
                raise ModelUnavailable(f"{key} is no longer in the model registry: {e}") from e
        if spec.pool != self.settings.pool:
            raise ModelUnavailable(
                f"{spec.key} is served by pool {spec.pool!r}, not by this worker's "
                f"({self.settings.pool!r})"
            )
        return spec

    async def acquire(self, spec: ModelSpec, deadline: float) -> tuple[HeldModel, float]:
        """The held model for `spec`, loading it first if need be; also the seconds spent
        waiting for a load (0 when it was ready). `release` it when the job is done."""
        started = time.monotonic()
        if spec.key not in self._held and (incoming := self._incoming.get(spec.key)):
            await incoming.wait()
        held = self._held.get(spec.key)
        cold = held is None or not held.settled.is_set()
        if held is None or (held.state == "failed" and held.spec != spec):
            async with self._loading:
                held = self._held.get(spec.key)
                if held is None or (held.state == "failed" and held.spec != spec):
                    held = HeldModel(spec)
                    self._held[spec.key] = held
                    self.on_change()
                    await self._load_on_demand(held, deadline)
        await held.settled.wait()
        if held.state == "failed":
            raise ModelUnavailable(f"model {spec.key} failed to load: {held.reason}")
        held.in_flight += 1
        held.last_used = time.monotonic()
        return held, (time.monotonic() - started) if cold else 0.0

    def release(self, held: HeldModel) -> None:
        held.in_flight -= 1
        held.last_used = time.monotonic()
        if held in self._retiring and held.in_flight == 0:
            self._retiring.remove(held)
            asyncio.get_running_loop().create_task(self._unload(held))
        self._released.set()
        self._released = asyncio.Event()

    async def reload(self, name: str) -> None:
        """Load the catalog's current weights for every version of `name` held here and swap
        them in; a held version the catalog dropped is replaced by what `name` now serves."""
        catalog = self.source.get(force=True)
        for held in [h for h in self._held.values() if h.spec.name == name]:
            if held.state == "failed":
                del self._held[held.spec.key]  # the next job retries with the new entry
                continue
            if held.state != "ready":
                continue
            spec = catalog.specs.get(held.spec.key)
            if spec is None and catalog.versions(name):
                spec = catalog.default_version(name)
            if spec is None or spec.pool != self.settings.pool:
                continue  # no longer served here: left for eviction
            await self._reload(held, spec)

    async def _reload(self, held: HeldModel, spec: ModelSpec) -> None:
        held.state = "reloading"
        self.on_change()
        incoming = None
        if spec.key not in self._held:
            incoming = self._incoming[spec.key] = asyncio.Event()
        try:
            await self._swap_in(held, spec)
        finally:
            if incoming is not None:
                del self._incoming[spec.key]
                incoming.set()

    async def _swap_in(self, held: HeldModel, spec: ModelSpec) -> None:
        try:
            lm = await asyncio.to_thread(load_spec, spec, self.settings)
        except _LOAD_ERRORS as e:
            held.state, held.reason = "ready", f"reload failed, still serving the old weights: {e}"
            logger.error("reload of %s failed: %s", spec.key, e)
            metrics.observe_load(spec.key, "failed", None, 0)
            self.on_change()
            return
        assert held.lm is not None
        assert held.engine is not None
        old_key = held.spec.key
        if swappable(held.lm, lm) and (spec.key == old_key or spec.key not in self._held):
            held.engine.swap_model(lm)  # applied between two decode steps
            del self._held[old_key]
            held.spec, held.lm, held.bytes = spec, lm, lm.weight_bytes
            held.state, held.reason, held.loaded_at = "ready", None, time.time()
            self._held[spec.key] = held
        else:
            # Another architecture (or the new version is already held): new rows go to the
            # new model, the old one finishes its rows and is unloaded.
            del self._held[old_key]
            held.state = "ready"
            if spec.key not in self._held:
                replacement = HeldModel(spec)
                self._held[spec.key] = replacement
                self._install(replacement, lm, start=True)
            if held.in_flight == 0:
                await self._unload(held)
            else:
                self._retiring.append(held)
        logger.info("reloaded %s as %s from %s", old_key, spec.key, lm.source)
        metrics.MODEL_BYTES.labels(*metrics.labels(old_key)).set(0)
        _loaded(spec.key, lm, "reloaded")
        self.on_change()

    async def _load_on_demand(self, held: HeldModel, deadline: float) -> None:
        spec = held.spec
        try:
            estimate = await asyncio.to_thread(estimated_bytes, spec, self.settings)
            await self._make_room(estimate, deadline, keep=held)
            lm = await asyncio.to_thread(load_spec, spec, self.settings)
        except _LOAD_ERRORS as e:
            self._fail(held, str(e))
            return
        except ModelUnavailable as e:  # no room: this job fails, a later one may fit
            self._fail(held, str(e))
            del self._held[spec.key]
            return
        except asyncio.CancelledError:
            # The job was stopped (worker shutdown): jobs waiting on this load must not hang.
            self._fail(held, "the load was interrupted; the next job retries it")
            del self._held[spec.key]
            raise
        self._install(held, lm, start=True)
        await self._make_room(0, 0.0, keep=held)  # the estimate may have been low

    def _install(self, held: HeldModel, lm: LoadedModel, *, start: bool) -> None:
        limits = engine_limits(self.settings, held.spec.engine)
        series = metrics.EngineMetrics()
        engine = Engine(lm, limits, self.on_step, decode_config(self.settings), on_stats=series)
        if start:
            engine.start()
        held.lm, held.engine, held.bytes = lm, engine, lm.weight_bytes
        held.engine_metrics = series
        held.state, held.reason, held.loaded_at = "ready", None, time.time()
        held.settled.set()
        logger.info("model %s ready (%.0f MB)", held.spec.key, held.bytes / 2**20)
        _loaded(held.spec.key, lm, "loaded")
        self.on_change()

    def _fail(self, held: HeldModel, reason: str) -> None:
        held.state, held.reason = "failed", reason
        held.settled.set()
        logger.error("model %s failed to load: %s", held.spec.key, reason)
        metrics.observe_load(held.spec.key, "failed", None, 0)
        self.on_change()

    async def _make_room(self, incoming: int, deadline: float, *, keep: HeldModel) -> None:
        """Unload idle models, least recently used first, until `incoming` more bytes fit the
        budget. Waits for busy models to go idle until `deadline` (0: no waiting). A model
        alone is always allowed, however large."""
        if not self._budget:
            return
        while True:
            others = [h for h in self._held.values() if h is not keep and h.state != "failed"]
            used = sum(h.bytes for h in others) + keep.bytes
            if not others or used + incoming <= self._budget:
                return
            idle = sorted((h for h in others if h.idle), key=lambda h: h.last_used)
            if idle:
                del self._held[idle[0].spec.key]
                logger.info("unloading %s to make room for %s", idle[0].spec.key, keep.spec.key)
                await self._unload(idle[0])
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if not deadline:
                    return
                raise ModelUnavailable(
                    f"no room to load {keep.spec.key}: the models loaded on this worker are "
                    f"busy and GENQ_MODEL_MEMORY_BUDGET_MB is "
                    f"{self.settings.model_memory_budget_mb:g}"
                )
            released = self._released
            try:
                await asyncio.wait_for(released.wait(), timeout=remaining)
            except TimeoutError:
                continue

    async def _unload(self, held: HeldModel) -> None:
        metrics.MODEL_BYTES.labels(*metrics.labels(held.spec.key)).set(0)
        if held.engine is not None:
            await asyncio.to_thread(held.engine.stop)
        if held.engine_metrics is not None:
            held.engine_metrics.close()  # once its engine's last step is done
        device = held.lm.device if held.lm is not None else None
        held.engine, held.engine_metrics, held.lm, held.bytes = None, None, None, 0
        self.on_change()
        gc.collect()
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()


def engine_limits(settings: Settings, spec: EngineSpec | None = None) -> EngineLimits:
    """A model's engine limits: its catalog entry's, the worker's settings for those unset."""
    e = spec or EngineSpec()
    return EngineLimits(
        max_batch_size=e.max_batch_size or settings.max_batch_size,
        max_batch_tokens=e.max_batch_tokens or settings.max_batch_tokens,
        max_prefill_tokens=e.max_prefill_tokens or settings.max_prefill_tokens,
        memory_limit_bytes=settings.memory_limit_mb * 2**20,
        prefix_cache_bytes=settings.prefix_cache_mb * 2**20,
    )


def decode_config(settings: Settings) -> DecodeConfig:
    return DecodeConfig(
        static=settings.static_decode,
        cuda_graphs=settings.cuda_graphs,
        gpu_memory_fraction=settings.gpu_memory_fraction,
        prefill_wait_steps=settings.prefill_wait_steps,
    )


def _loaded(key: str, lm: LoadedModel, outcome: str) -> None:
    metrics.observe_load(key, outcome, lm.load_s, lm.weight_bytes)
