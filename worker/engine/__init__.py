"""The batching engine: scheduling, batches and their KV cache, the fused forward pass, sampling,
the prefix cache and the text side. The process side of the worker (`worker.main`,
`worker.service`, `worker.models`, ...) drives it through what this package exports."""

from worker.engine.detokenizer import StepCallback
from worker.engine.engine import Engine, EngineHealth, EngineRequest
from worker.engine.generation import Generation, GenerationError, RowOutput
from worker.engine.modes import DecodeConfig, DecodeMode
from worker.engine.scheduling import EngineLimits

__all__ = [
    "DecodeConfig",
    "DecodeMode",
    "Engine",
    "EngineHealth",
    "EngineLimits",
    "EngineRequest",
    "Generation",
    "GenerationError",
    "RowOutput",
    "StepCallback",
]
