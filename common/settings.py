"""Process settings: one object per process, read from `GENQ_*` environment variables at startup."""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
ENV_PREFIX = "GENQ_"
# GENQ_* variables genq reads that are not settings: never reported as unknown.
OWN_VARIABLES = frozenset(
    {
        "GENQ_FUZZ_SEED",  # tests/test_fuzz.py: replays a fuzz run
    }
)


class Settings(BaseSettings):
    """Every knob of genq. Gateway and worker read the same class; each uses its own part."""

    # `extra="ignore"` is about keyword arguments; unknown GENQ_* variables are caught by
    # `unknown_variables` (a warning at start, or a refusal with GENQ_STRICT_SETTINGS).
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    strict_settings: bool = Field(
        False,
        description="Refuse to start when a GENQ_* variable names no setting (a misspelling); "
        "off, each such variable is a warning at start naming the closest setting.",
    )

    # Redis
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis URL; may carry a password, so it is never logged.",
    )
    redis_url_file: Path | None = Field(
        None, description="File holding the Redis URL (a mounted secret); wins over GENQ_REDIS_URL."
    )
    redis_sentinels: str = Field(
        "",
        description="Sentinels as comma-separated `host:port`; set, clients ask them for the "
        "primary of GENQ_REDIS_SENTINEL_SERVICE and follow its failovers, and GENQ_REDIS_URL "
        "gives only the data nodes' password and database. Empty: GENQ_REDIS_URL is the Redis.",
    )
    redis_sentinel_service: str = Field(
        "genq", min_length=1, description="The name the sentinels monitor the primary under."
    )
    redis_sentinel_password: SecretStr | None = Field(
        None, description="Password of the sentinels (their `requirepass`)."
    )
    redis_sentinel_password_file: Path | None = Field(
        None, description="File holding the sentinels' password; wins over the variable."
    )
    redis_min_replicas_ack: int | None = Field(
        None,
        ge=0,
        description="Replicas that must hold a new job before the gateway acknowledges it "
        "(Redis WAIT); otherwise 503. Unset: 1 with Sentinel, 0 without.",
    )
    redis_ack_timeout_ms: int = Field(
        500, ge=1, description="How long the gateway waits for those replicas before its 503."
    )
    redis_connect_timeout_s: float = Field(1.0, gt=0)
    redis_socket_timeout_s: float = Field(
        5.0, gt=0, description="Worker: timeout of one Redis command."
    )

    # Gateway
    redis_command_timeout_s: float = Field(
        1.0,
        gt=0,
        description="Gateway: longest wait for a pooled connection and for one Redis reply (a "
        "blocking stream read gets it on top of its block time).",
    )
    redis_breaker_failures: int = Field(
        3, ge=1, description="Redis errors or timeouts in a row that open the circuit breaker."
    )
    redis_breaker_reset_s: float = Field(
        2.0, gt=0, description="How long the open breaker answers 503 before it tries Redis again."
    )
    redis_probe_interval_s: float = Field(
        0.25,
        gt=0,
        description="Gateway: pause between two PINGs of its Redis probe, which opens the circuit "
        "breaker when one goes unanswered and closes it when Redis answers again.",
    )
    redis_probe_timeout_s: float = Field(
        0.25,
        gt=0,
        description="Gateway: how long the probe's PING waits for Redis's answer; past it Redis "
        "counts as stalled.",
    )
    redis_max_connections: int = Field(
        100, ge=1, description="Gateway connections to Redis for ordinary commands."
    )
    redis_max_stream_connections: int = Field(
        1000,
        ge=1,
        description="Gateway connections to Redis held by clients waiting on a job's events: "
        "one per open event stream or synchronous wait.",
    )
    shutdown_grace_s: float = Field(
        10.0,
        gt=0,
        description="On SIGTERM, how long requests still open after streams and waits were ended "
        "get to finish before they are cut.",
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    gateway_processes: int = Field(
        1,
        ge=1,
        le=64,
        description="Gateway: uvicorn processes serving the port; past 1, metrics use "
        "prometheus-client's multiprocess mode.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    log_payloads: bool = Field(
        False,
        description="Debugging only: workers log each job's prompt and generated text, which "
        "may hold personal data. Off, no prompt or output is ever logged.",
    )
    max_body_bytes: int = Field(1_000_000, gt=0, description="Largest request body accepted (413).")
    max_prompt_chars: int = Field(32_000, gt=0)
    max_messages: int = Field(256, gt=0)
    max_tools: int = Field(128, ge=0, description="Most function tools of a request.")
    max_new_tokens_limit: int = Field(2048, gt=0, description="Upper bound of max_new_tokens.")
    default_max_new_tokens: int = Field(128, gt=0)
    max_stop_sequences: int = Field(4, ge=0)
    max_stop_chars: int = Field(64, gt=0)
    max_logit_bias: int = Field(300, ge=0, description="Most logit_bias entries of a request.")
    max_bad_words: int = Field(16, ge=0, description="Most bad_words of a request.")
    max_grammar_chars: int = Field(
        65536,
        ge=1,
        description="Largest structured output of a request (its JSON schema, regex, choices or "
        "grammar, as text).",
    )
    max_queue_depth: int = Field(10_000, gt=0, description="Queued jobs per pool before 429.")
    sync_timeout_s: float = Field(60.0, gt=0, description="Default wait of POST /v1/generate.")
    max_sync_timeout_s: float = Field(300.0, gt=0)
    cancel_wait_s: float = Field(
        5.0, gt=0, description="How long DELETE /v1/jobs/{id} waits for a running job to stop."
    )
    sse_ping_s: float = Field(15.0, gt=0, description="Keep-alive comment interval on SSE streams.")
    queue_full_retry_after_s: int = Field(5, ge=1)
    max_batch_requests: int = Field(100, ge=1, description="Items in one POST /v1/jobs/batch.")
    max_choices: int = Field(
        16, ge=1, description="Largest `n` of the OpenAI routes: jobs one request may start."
    )
    idempotency_ttl_s: int = Field(86_400, gt=0, description="How long an Idempotency-Key holds.")
    cache_enabled: bool = Field(
        True, description="Serve identical deterministic requests from one job (cache + dedup)."
    )
    cache_ttl_s: int = Field(
        3_600, gt=0, description="How long a result serves identical requests."
    )
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Webhook targets, as JSON: host names, `host:port`, IP addresses or networks "
        "(`10.0.0.0/24`). Empty: webhooks are off.",
    )
    webhook_allow_http: bool = Field(
        False, description="Let webhooks use plain http (https is required otherwise)."
    )
    webhook_secret: SecretStr | None = Field(None, description="HMAC-SHA256 key of webhooks.")
    webhook_secret_file: Path | None = Field(None, description="File holding the webhook key.")
    webhook_max_tries: int = Field(6, ge=1, description="Delivery attempts per webhook.")
    webhook_retry_base_s: float = Field(
        2.0, gt=0, description="First retry delay; it doubles with every failed attempt."
    )
    webhook_timeout_s: float = Field(10.0, gt=0, description="Timeout of one delivery.")
    webhook_ca_file: Path | None = Field(
        None,
        description="PEM file of the certificate authorities https receivers' certificates are "
        "checked against, in place of the public ones (a private CA); unset: the public ones.",
    )
    # Security and traffic control (gateway)
    api_keys: SecretStr | None = Field(
        None,
        description='API keys as JSON: {"<key>": {"name": ..., "scopes": [...], "limits": {...}}}.',
    )
    api_keys_file: Path | None = Field(
        None,
        description="File holding the API keys' JSON (a mounted secret); wins over GENQ_API_KEYS.",
    )
    allow_anonymous: bool = Field(
        False, description="Without API keys, serve every client as one anonymous caller."
    )
    allow_anonymous_remote: bool = Field(
        False, description="Allow anonymous access on a bind address other than loopback."
    )
    share_across_keys: bool = Field(
        False,
        description="Let identical requests of different keys share jobs, cached results and "
        "prefix-cache entries (off: each key sees only its own).",
    )
    rate_limit_requests_per_minute: int = Field(
        600, ge=0, description="Generation requests per key and minute; 0 is off."
    )
    rate_limit_tokens_per_minute: int = Field(
        200_000,
        ge=0,
        description="Tokens per key and minute, counted as max_new_tokens at acceptance; 0 is off.",
    )
    rate_limit_concurrent: int = Field(
        256, ge=0, description="Jobs per key queued or running at once; 0 is off."
    )
    rate_limit_fail_open: bool = Field(
        False,
        description="When the limiter cannot reach Redis, accept submissions unlimited (off: 503).",
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description='Host header values the gateway answers, as JSON: ["api.example.com", '
        '"*.example.com"]. Unset: the loopback names on a loopback bind, any host otherwise.',
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description='Origins browsers may call the API from, as JSON: ["https://app.example.com"].',
    )
    cors_allow_credentials: bool = Field(
        False, description="Let those origins send credentials (cookies); not with a wildcard."
    )
    priority_step_s: int = Field(
        30, ge=0, description="Queue head start of each priority level over the next one."
    )

    # Jobs, shared by both sides
    pool: str = Field("default", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    result_ttl_s: int = Field(
        86_400, gt=0, description="How long finished jobs and events are kept."
    )
    events_maxlen: int = Field(
        10_000,
        gt=0,
        description="Approximate cap of a job's event stream; above GENQ_MAX_NEW_TOKENS_LIMIT.",
    )
    job_timeout_s: int = Field(600, gt=0)
    max_tries: int = Field(3, ge=1)

    # Worker
    model: str | None = Field(
        None,
        description="Checkpoint directory, GGUF file or hub id; unset means the default model.",
    )
    model_name: str | None = Field(None, description="Name the model is served under.")
    models_file: Path | None = Field(
        None,
        description="YAML model registry (see docs/models.md); unset: GENQ_MODEL is the one "
        "model, preloaded, with alias `default`.",
    )
    model_memory_budget_mb: float = Field(
        0,
        ge=0,
        description="Weights a worker keeps loaded; past it the least recently used idle model "
        "is unloaded. 0 is unlimited.",
    )
    model_cache_dir: Path = Field(Path.home() / ".cache" / "genq")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = Field(
        False,
        description="torch.compile what the engine runs: the static path's decode step (every "
        "bucket at start-up), else the model's forward pass. A compile error, then or at run "
        "time, turns it off and the step runs eagerly.",
    )
    static_decode: Literal["auto", "on", "off"] = Field(
        "auto",
        description="The static decode path (a preallocated KV cache of GENQ_MAX_BATCH_SIZE "
        "slots, decode steps padded to buckets): `auto` on CUDA devices for Llama, Mistral, "
        "Qwen2 and Qwen3 models, `on` on any device, `off` never.",
    )
    cuda_graphs: bool = Field(
        True,
        description="On the static path on CUDA, capture every decode bucket as a CUDA graph at "
        "start-up and replay it at every decode step.",
    )
    gpu_memory_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="On the static path on CUDA, size the KV cache so that the process uses "
        "this fraction of the GPU's memory (weights, cache, 1 GiB of activations); 0 sizes it "
        "from GENQ_MAX_BATCH_TOKENS. Leave 0 with several models per worker.",
    )
    prefill_wait_steps: int = Field(
        4,
        ge=0,
        description="With CUDA graphs, decode steps a new request may wait while rows decode, "
        "so that one prefill serves several; 0 prefills at once.",
    )
    max_batch_size: int = Field(32, ge=1, description="Rows decoded together.")
    max_batch_tokens: int = Field(
        65_536,
        ge=1,
        description="KV-cache tokens the left-padded batch may hold at its peak; on the static "
        "path, the cache's size, split evenly between the slots.",
    )
    max_prefill_tokens: int = Field(
        4_096, ge=1, description="Padded prompt tokens prefilled in one step."
    )
    memory_limit_mb: int = Field(
        0, ge=0, description="Admit no rows past this RSS (CPU) or GPU allocation; 0 is off."
    )
    prefix_cache_mb: int = Field(
        256,
        ge=0,
        description="Keys and values of recent prompts kept per model, reused by later prompts "
        "that start the same way; 0 turns prefix caching off.",
    )
    worker_max_jobs: int = Field(64, ge=1, description="Jobs a worker holds (running + waiting).")
    worker_queue_read_limit: int = Field(1000, ge=1)
    worker_poll_delay_s: float = Field(
        0.25,
        gt=0,
        description="How often an idle worker looks at its queue without a wake-up (each "
        "submission wakes the pool's workers at once).",
    )
    worker_job_completion_wait_s: int = Field(30, ge=0)
    worker_heartbeat_s: float = Field(5.0, gt=0)
    worker_metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of /metrics, /healthz and /readyz; 0 turns it off."
    )
    worker_watchdog_timeout_s: float = Field(
        300.0,
        gt=0,
        description="An engine step or the event loop stuck this long stops the worker (exit 3).",
    )

    # Dev stack (`genq run`)
    var_dir: Path = Field(Path("var"), description="Where the embedded Redis keeps its data.")
    embedded_redis_port: int = Field(6399, ge=1, le=65535)

    @classmethod
    def variables(cls) -> frozenset[str]:
        """Every environment variable a setting is read from, upper case. pydantic-settings
        names them itself, so that aliases and the prefix count exactly as it reads them."""
        source = EnvSettingsSource(cls)
        return frozenset(
            env_name.upper()
            for name, field in cls.model_fields.items()
            for _, env_name, _ in source._extract_field_info(field, name)
        )

    @classmethod
    def unknown_variables(cls, environ: Mapping[str, str]) -> list[str]:
        """Each GENQ_* variable of `environ` that no setting reads (nor genq itself), with the
        closest setting's variable where one is close: `GENQ_MAX_BATCH_SZE (did you mean
        GENQ_MAX_BATCH_SIZE?)`. Names are matched as pydantic-settings does, in any case."""
        known = cls.variables() | OWN_VARIABLES
        unknown = []
        for name in sorted(environ):
            upper = name.upper()
            if not upper.startswith(ENV_PREFIX) or upper in known:
                continue
            close = difflib.get_close_matches(upper, known, n=1)
            unknown.append(f"{name} (did you mean {close[0]}?)" if close else name)
        return unknown

    @model_validator(mode="after")
    def _refuse_unknown_variables(self) -> Settings:
        if self.strict_settings and (unknown := self.unknown_variables(os.environ)):
            raise ValueError(
                f"GENQ_STRICT_SETTINGS: no setting reads {', '.join(unknown)}; fix or unset them"
            )
        return self

    @model_validator(mode="after")
    def _read_secret_files(self) -> Settings:
        if self.redis_url_file is not None:
            try:
                url = self.redis_url_file.read_text().strip()
            except OSError as e:
                raise ValueError(f"GENQ_REDIS_URL_FILE {self.redis_url_file}: {e.strerror}") from e
            object.__setattr__(self, "redis_url", SecretStr(url))
        if self.redis_sentinel_password_file is not None:
            try:
                password = self.redis_sentinel_password_file.read_text().strip()
            except OSError as e:
                raise ValueError(
                    f"GENQ_REDIS_SENTINEL_PASSWORD_FILE {self.redis_sentinel_password_file}: "
                    f"{e.strerror}"
                ) from e
            object.__setattr__(self, "redis_sentinel_password", SecretStr(password))
        _parse_sentinels(self.redis_sentinels)
        if self.webhook_secret_file is not None:
            try:
                secret = self.webhook_secret_file.read_text().strip()
            except OSError as e:
                raise ValueError(
                    f"GENQ_WEBHOOK_SECRET_FILE {self.webhook_secret_file}: {e.strerror}"
                ) from e
            object.__setattr__(self, "webhook_secret", SecretStr(secret))
        if self.api_keys_file is not None:
            try:
                keys = self.api_keys_file.read_text()
            except OSError as e:
                raise ValueError(f"GENQ_API_KEYS_FILE {self.api_keys_file}: {e.strerror}") from e
            object.__setattr__(self, "api_keys", SecretStr(keys))
        if self.cors_allow_credentials and "*" in self.cors_origins:
            raise ValueError(
                "GENQ_CORS_ALLOW_CREDENTIALS=true needs explicit GENQ_CORS_ORIGINS, not '*'"
            )
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                "GENQ_DEFAULT_MAX_NEW_TOKENS must not exceed GENQ_MAX_NEW_TOKENS_LIMIT"
            )
        # A re-run goes on from every token event its job published (an event carries one token
        # or more, plus the closing one): a stream trimmed below that fails the re-run.
        if self.events_maxlen <= self.max_new_tokens_limit:
            raise ValueError(
                f"GENQ_EVENTS_MAXLEN ({self.events_maxlen}) must exceed GENQ_MAX_NEW_TOKENS_LIMIT "
                f"({self.max_new_tokens_limit}): a job whose worker dies goes on from all its "
                "events"
            )
        return self

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        """GENQ_REDIS_SENTINELS as (host, port) pairs; empty without Sentinel."""
        return _parse_sentinels(self.redis_sentinels)

    @property
    def replicas_ack(self) -> int:
        """Replicas a new job must reach before it is acknowledged. With Sentinel a failover
        promotes a replica: a job only the old primary held would be lost with it, so the
        default then is one."""
        if self.redis_min_replicas_ack is not None:
            return self.redis_min_replicas_ack
        return 1 if self.sentinel_addresses else 0

    @property
    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.model is None:
            return DEFAULT_MODEL_NAME
        return Path(self.model.rstrip("/")).stem.lower()


def _parse_sentinels(value: str) -> list[tuple[str, int]]:
    addresses = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"GENQ_REDIS_SENTINELS: {item!r} is not host:port")
        addresses.append((host.strip("[]"), int(port)))
    return addresses


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
