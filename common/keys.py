"""Every Redis key genq uses. No other module spells a key."""

from __future__ import annotations

from arq.constants import in_progress_key_prefix, job_key_prefix, retry_key_prefix

PREFIX = "genq"


def job(job_id: str) -> str:
    """Hash: the job record (status, model, timestamps, result, error; `owner:<principal>`
    fields name who may see it)."""
    return f"{PREFIX}:job:{job_id}"


def job_prefix() -> str:
    """What `job` puts before an id, for scripts that find records by id."""
    return job("")


def events(job_id: str) -> str:
    """Stream: the job's `token` events, then one `done` or `error`."""
    return f"{PREFIX}:events:{job_id}"


def queue(pool: str) -> str:
    """arq queue (sorted set of job ids scored by due time) of one worker pool."""
    return f"{PREFIX}:queue:{pool}"


def routing() -> str:
    """Hash: `alias:<alias>` -> target, `traffic:<name>` -> JSON weights by version, set through
    the admin API and overriding the models file's; `registry_revision`, the catalog revision,
    bumped by reloads."""
    return f"{PREFIX}:routing"


def control() -> str:
    """Pub/sub channel: JSON commands to every worker (model reloads)."""
    return f"{PREFIX}:control"


def workers(pool: str) -> str:
    """Sorted set: worker id -> time of its last heartbeat (epoch seconds)."""
    return f"{PREFIX}:workers:{pool}"


def worker(worker_id: str) -> str:
    """String: JSON heartbeat of one worker (models, running jobs); expires if it dies."""
    return f"{PREFIX}:worker:{worker_id}"


def worker_health(worker_id: str) -> str:
    """arq's per-process health-check key."""
    return f"{PREFIX}:worker-health:{worker_id}"


def wake(pool: str) -> str:
    """Pub/sub channel: a job was queued on `pool`; its idle workers look at the queue now
    rather than at their next poll."""
    return f"{PREFIX}:wake:{pool}"


def cancellations() -> str:
    """Pub/sub channel: ids of running jobs to cancel; every worker listens."""
    return f"{PREFIX}:cancel"


def reaper_turn(pool: str) -> str:
    """String (TTL): held by the process that sweeps `pool` for orphaned jobs this interval."""
    return f"{PREFIX}:reaper:{pool}"


def arq_job(job_id: str) -> str:
    """arq's payload of a queued job."""
    return f"{job_key_prefix}{job_id}"


def arq_in_progress(job_id: str) -> str:
    """arq's claim on a job a worker has started (it stays in the queue until it finishes). It is
    the job's lease: it expires unless the worker's heartbeat renews it."""
    return f"{in_progress_key_prefix}{job_id}"


def arq_retry(job_id: str) -> str:
    """arq's count of the times a worker started the job."""
    return f"{retry_key_prefix}{job_id}"


def running(pool: str) -> str:
    """Sorted set: job id -> start time of the jobs of `pool` that a worker has started; the
    reaper's list of jobs whose leases it checks."""
    return f"{PREFIX}:running:{pool}"


def starts(pool: str) -> str:
    """Sorted set: job id -> when a worker of the pool started it (recent ones only)."""
    return f"{PREFIX}:starts:{pool}"


def deliveries(job_id: str) -> str:
    """List: JSON log of a job's webhook delivery attempts."""
    return f"{PREFIX}:deliveries:{job_id}"


def idempotency(owner: str, key: str, choice: int = 0) -> str:
    """String: `{job id} {request fingerprint}` for an Idempotency-Key of one API key. A request
    of n choices (OpenAI's `n`) holds one per choice; choice 0's is the key of a request of one."""
    if choice == 0:
        return f"{PREFIX}:idem:{owner}:{key}"
    return f"{PREFIX}:idem-choice:{owner}:{choice}:{key}"


def result_cache(fingerprint: str) -> str:
    """String: id of the job that serves identical deterministic requests."""
    return f"{PREFIX}:cache:{fingerprint}"


def in_flight(owner: str) -> str:
    """Set: ids of an API key's jobs that have not ended (its concurrency limit)."""
    return f"{PREFIX}:inflight:{owner}"


def replication_mark() -> str:
    """String: a throwaway write whose WAIT tells a gateway that the replicas hold everything
    written before it (they apply the primary's writes in order)."""
    return f"{PREFIX}:replication-mark"


def rate_limits() -> str:
    """Prefix of the `limits` library's counters (requests and tokens per key and minute)."""
    return f"{PREFIX}:ratelimit"
