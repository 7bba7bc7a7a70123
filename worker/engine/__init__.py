"""The batching engine: scheduling, the decode paths (eager and static) with their batches and KV
caches, sampling, the prefix cache and the text side. The process side of the worker
(`worker.main`, the job runner, the model manager, `worker.metrics`) drives it through what this
package exports; nothing here imports the rest of the worker."""

from worker.engine.config import DecodeConfig, DecodeMode, EngineLimits
from worker.engine.detokenizer import StepCallback
from worker.engine.engine import Engine, EngineHealth, EngineRequest
from worker.engine.generation import Generation, GenerationError, RowOutput
from worker.engine.memory import MemoryMonitor
from worker.engine.model import LoadedModel
from worker.engine.resume import Resume
from worker.engine.sampling import SamplingParams
from worker.engine.stats import StatsCallback, StepStats

__all__ = [
    "DecodeConfig",
    "DecodeMode",
    "Engine",
    "EngineHealth",
    "EngineLimits",
    "EngineRequest",
    "Generation",
    "GenerationError",
    "LoadedModel",
    "MemoryMonitor",
    "Resume",
    "RowOutput",
    "SamplingParams",
    "StatsCallback",
    "StepCallback",
    "StepStats",
]
