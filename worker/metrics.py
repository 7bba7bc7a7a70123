"""Worker-side Prometheus metrics, served on GENQ_WORKER_METRICS_PORT when it is set."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from worker.engine import Generation

JOBS_FINISHED = Counter(
    "genq_worker_jobs_total", "Jobs finished by this worker", ["model", "status"]
)
TOKENS_GENERATED = Counter("genq_worker_generated_tokens_total", "Tokens generated", ["model"])
PROMPT_TOKENS = Counter("genq_worker_prompt_tokens_total", "Prompt tokens processed", ["model"])
TIME_TO_FIRST_TOKEN = Histogram(
    "genq_worker_time_to_first_token_seconds",
    "From the start of generation to the first token",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
GENERATION_SECONDS = Histogram(
    "genq_worker_generation_seconds",
    "Time spent generating one job",
    ["model"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
RUNNING_JOBS = Gauge("genq_worker_running_jobs", "Jobs being generated now")


def observe_generation(model: str, outcome: Generation) -> None:
    TOKENS_GENERATED.labels(model).inc(outcome.completion_tokens)
    PROMPT_TOKENS.labels(model).inc(outcome.prompt_tokens)
    GENERATION_SECONDS.labels(model).observe(outcome.generation_s)
    if outcome.time_to_first_token_s is not None:
        TIME_TO_FIRST_TOKEN.labels(model).observe(outcome.time_to_first_token_s)


BATCH_SIZE = Gauge("genq_worker_batch_size", "Rows in the model's running batch", ["model"])
WAITING_REQUESTS = Gauge(
    "genq_worker_waiting_requests", "Requests waiting for a batch row", ["model"]
)
MODEL_LOADS = Counter(
    "genq_worker_model_loads_total",
    "Model loads by outcome: loaded, reloaded, failed",
    ["model", "outcome"],
)
MODEL_LOAD_SECONDS = Histogram(
    "genq_worker_model_load_seconds",
    "Time to load a model (checkpoint conversion and warm-up included)",
    ["model"],
    buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
)
MODEL_BYTES = Gauge(
    "genq_worker_model_bytes", "Memory the weights of a loaded model take", ["model"]
)
PREFIX_CACHE_HIT_TOKENS = Counter(
    "genq_worker_prefix_cache_hit_tokens_total",
    "Prompt tokens whose keys and values came from the prefix cache instead of a prefill",
    ["model"],
)
PREFIX_CACHE_BYTES = Gauge(
    "genq_worker_prefix_cache_bytes", "Memory the prefix cache's entries take", ["model"]
)
RSS_BYTES = Gauge("genq_worker_rss_bytes", "Resident memory of the worker process")
CUDA_ALLOCATED_BYTES = Gauge("genq_worker_cuda_allocated_bytes", "GPU memory allocated by torch")
CUDA_RESERVED_BYTES = Gauge("genq_worker_cuda_reserved_bytes", "GPU memory reserved by torch")
