"""Which decode path an engine takes: the one place where the static path falls back to the
eager one."""

from __future__ import annotations

import logging
from typing import Any

import torch

from worker.engine.config import DecodeConfig, EngineLimits
from worker.engine.decode_path import DecodePath
from worker.engine.eager.path import EagerPath
from worker.engine.memory import MemoryMonitor
from worker.engine.model import LoadedModel
from worker.engine.prefix_cache import PrefixCache
from worker.engine.static.cache import CacheTooSmall
from worker.engine.static.decoder import unsupported
from worker.engine.static.path import StaticPath

logger = logging.getLogger(__name__)


def choose_path(
    lm: LoadedModel,
    limits: EngineLimits,
    config: DecodeConfig,
    prefix_cache: PrefixCache,
    memory: MemoryMonitor,
) -> DecodePath[Any]:
    """The static path (its cache allocated, its buckets compiled and captured as far as that
    works) where configured and supported, else the eager one, its forward pass compiled if
    asked. Whatever does not work is said once, in the log and in the mode; requests are served
    either way."""
    note = None
    if config.static == "on" or (config.static == "auto" and lm.device.type == "cuda"):
        note = unsupported(lm)
        if note is None:
            try:
                static = StaticPath(lm, limits, config, prefix_cache, memory)
                static.prepare()
                return static
            except (CacheTooSmall, torch.OutOfMemoryError) as e:
                note = str(e)
                memory.release()
        note = f"the static decode path is off: {note}"
        logger.warning("%s (model %s)", note, lm.name)
    eager = EagerPath(lm, limits, config, prefix_cache, memory, note=note)
    eager.prepare()
    return eager
