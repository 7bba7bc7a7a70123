"""API keys, per-key isolation, rate limits across gateways, hardened inputs, hosts and CORS."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.settings import Settings
from genq.redis_server import RedisServer, free_port
from tests import keys
from tests.conftest import TINY_NAME
from tests.keys import bearer
from tests.procs import Proc, genq_env, running_stack, start_gateway, start_worker

ORIGIN = "https://app.example.com"


@dataclass(frozen=True)
class KeyedStack:
    base: str
    worker: Proc


@pytest.fixture(scope="module")
def keyed(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, log_dir: Path
) -> Iterator[KeyedStack]:
    """A gateway with API keys and a worker serving the tiny model."""
    server = RedisServer(tmp_path_factory.mktemp("keyed-redis"), free_port(), persist=False)
    server.start()
    env = genq_env(
        server.url,
        GENQ_API_KEYS=keys.keys_json(),
        GENQ_MODEL=str(tiny_model_dir),
        GENQ_MODEL_NAME=TINY_NAME,
        GENQ_CORS_ORIGINS=f'["{ORIGIN}"]',
    )
    procs: list[Proc] = []
    try:
        gateway, base = start_gateway(env, log_dir)
        procs.append(gateway)
        procs.append(start_worker(env, log_dir, base, TINY_NAME))
        yield KeyedStack(base, procs[-1])
    finally:
        for proc in reversed(procs):
            proc.stop()
        server.stop()


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory, log_dir: Path) -> Iterator[list[str]]:
    """Two gateways sharing one Redis, with no worker: accepted jobs stay queued (in flight)."""
    server = RedisServer(tmp_path_factory.mktemp("limits-redis"), free_port(), persist=False)
    server.start()
    env = genq_env(server.url, GENQ_API_KEYS=keys.keys_json())
    procs: list[Proc] = []
    bases: list[str] = []
    try:
        for _ in range(2):
            proc, base = start_gateway(env, log_dir)
            procs.append(proc)
            bases.append(base)
        yield bases
    finally:
        for proc in procs:
            proc.stop()
        server.stop()


def submit(base: str, key: str, **fields: Any) -> httpx.Response:
    body = {"prompt": "Once upon a time", "max_new_tokens": 1, **fields}
    return httpx.post(f"{base}/v1/jobs", json=body, headers=bearer(key), timeout=10)


def finished(base: str, key: str, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(
            f"{base}/v1/jobs/{job_id}", headers=bearer(key), timeout=10
        ).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


# --- Keys and scopes --------------------------------------------------------------------------


def rejections(base: str, reason: str) -> float:
    """The gateway's `genq_requests_rejected_total` for `reason`."""
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for sample in family.samples:
            if sample.name == "genq_requests_rejected_total" and sample.labels == {
                "reason": reason
            }:
                return sample.value
    return 0.0


def test_a_request_without_a_valid_key_is_401(keyed: KeyedStack) -> None:
    before = rejections(keyed.base, "unauthorized")
    wrong = b"sk-not-a-key-of-this-gateway-00"
    headers: list[tuple[bytes, bytes]]
    for headers in [
        [],
        [(b"authorization", b"Bearer " + wrong)],
        [(b"x-api-key", wrong)],
        [(b"authorization", b"Basic YWxpY2U6c2VjcmV0")],
        [(b"authorization", b"Bearer \xe9\xff\x80 not ascii")],
    ]:
        resp = httpx.post(f"{keyed.base}/v1/jobs", json={"prompt": "x"}, headers=headers)
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["code"] == "unauthorized"
        assert resp.headers["www-authenticate"].startswith("Bearer")
    assert rejections(keyed.base, "unauthorized") == before + 5


def test_either_header_carries_a_key(keyed: KeyedStack) -> None:
    for headers in [bearer(keys.ALICE), {"x-api-key": keys.ALICE}]:
        resp = httpx.get(f"{keyed.base}/v1/models", headers=headers)
        assert resp.status_code == 200, resp.text


def test_a_key_without_the_scope_is_403(keyed: KeyedStack) -> None:
    before = rejections(keyed.base, "forbidden")
    resp = submit(keyed.base, keys.READER)
    assert resp.status_code == 403
    assert rejections(keyed.base, "forbidden") == before + 1
    assert "`generate` scope" in resp.json()["error"]["message"]
    assert httpx.get(f"{keyed.base}/v1/queue", headers=bearer(keys.READER)).status_code == 200
    admin = httpx.put(
        f"{keyed.base}/v1/admin/aliases/x", json={"target": TINY_NAME}, headers=bearer(keys.ALICE)
    )
    assert admin.status_code == 403


def test_probes_and_metrics_need_no_key(keyed: KeyedStack) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{keyed.base}{path}").status_code == 200, path


# --- Isolation --------------------------------------------------------------------------------


def test_a_job_is_seen_streamed_and_cancelled_only_with_its_own_key(keyed: KeyedStack) -> None:
    job_id = submit(keyed.base, keys.ALICE, max_new_tokens=4).json()["id"]
    with httpx.Client(base_url=keyed.base, headers=bearer(keys.BOB), timeout=10) as bob:
        for method, path in [
            ("GET", f"/v1/jobs/{job_id}"),
            ("DELETE", f"/v1/jobs/{job_id}"),
            ("GET", f"/v1/jobs/{job_id}/events"),
        ]:
            resp = bob.request(method, path)
            assert resp.status_code == 404, (method, path, resp.text)
            assert resp.json()["error"]["code"] == "job_not_found"
    assert finished(keyed.base, keys.ALICE, job_id)["status"] == "succeeded"


def test_idempotency_keys_belong_to_one_api_key(keyed: KeyedStack) -> None:
    headers = {"Idempotency-Key": "order-7"}
    with httpx.Client(base_url=keyed.base, timeout=10) as client:
        alice = client.post(
            "/v1/jobs", json={"prompt": "A"}, headers={**headers, **bearer(keys.ALICE)}
        )
        # Another body with the same Idempotency-Key: a conflict for Alice, a new job for Bob.
        bob = client.post("/v1/jobs", json={"prompt": "B"}, headers={**headers, **bearer(keys.BOB)})
        again = client.post(
            "/v1/jobs", json={"prompt": "B"}, headers={**headers, **bearer(keys.ALICE)}
        )
    assert (alice.status_code, bob.status_code, again.status_code) == (202, 202, 409)
    assert alice.json()["id"] != bob.json()["id"]


def test_identical_requests_of_two_keys_do_not_share_jobs_or_results(keyed: KeyedStack) -> None:
    body = {"prompt": "Shared question", "temperature": 0, "max_new_tokens": 4}
    first = submit(keyed.base, keys.ALICE, **body).json()
    finished(keyed.base, keys.ALICE, first["id"])
    mine = submit(keyed.base, keys.ALICE, **body).json()
    theirs = submit(keyed.base, keys.BOB, **body).json()
    assert (mine["id"], mine["cached"]) == (first["id"], True)
    assert theirs["id"] != first["id"]
    assert not theirs["cached"]


def test_cached_prompt_tokens_count_only_the_keys_own_prompts(keyed: KeyedStack) -> None:
    start = "You are a careful assistant of the Sixth Bank. " * 6
    body = {"temperature": 0, "max_new_tokens": 2}
    first = submit(keyed.base, keys.ALICE, prompt=start + "First question?", **body).json()
    finished(keyed.base, keys.ALICE, first["id"])
    usage = {}
    for key in (keys.ALICE, keys.BOB):
        job = submit(keyed.base, key, prompt=start + "Second question?", **body).json()
        usage[key] = finished(keyed.base, key, job["id"])["result"]["usage"]
    assert usage[keys.ALICE]["cached_prompt_tokens"] > 0
    # Bob's prompt starts the same, but Alice's prompts are not his to match, or to learn of.
    assert usage[keys.BOB]["cached_prompt_tokens"] == 0


def test_prompts_are_not_in_the_worker_log(keyed: KeyedStack) -> None:
    prompt = "a prompt that must stay out of the logs"
    job = submit(keyed.base, keys.ALICE, prompt=prompt).json()
    finished(keyed.base, keys.ALICE, job["id"])
    log = keyed.worker.log.read_text()
    assert job["id"] in log  # its start and end are logged, by id
    assert "stay out of" not in log


# --- Rate limits, shared by two gateways --------------------------------------------------------


def test_requests_per_minute_hold_across_gateways(gateways: list[str]) -> None:
    answers = [
        submit(gateways[i % 2], keys.FEW_REQUESTS) for i in range(keys.REQUESTS_PER_MINUTE + 1)
    ]
    assert [a.status_code for a in answers] == [202] * keys.REQUESTS_PER_MINUTE + [429]
    q = keys.REQUESTS_PER_MINUTE
    assert answers[0].headers["ratelimit-policy"].startswith(f'"requests";q={q};w=60')
    assert answers[0].headers["ratelimit"].startswith(f'"requests";r={q - 1};t=')
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert "requests_per_minute" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["ratelimit"].startswith('"requests";r=0;t=')
    assert sum(rejections(base, "requests_per_minute") for base in gateways) == 1


def test_tokens_per_minute_count_max_new_tokens_across_gateways(gateways: list[str]) -> None:
    assert submit(gateways[0], keys.FEW_TOKENS, max_new_tokens=20).status_code == 202
    refused = submit(gateways[1], keys.FEW_TOKENS, max_new_tokens=20)
    assert refused.status_code == 429
    assert "tokens_per_minute" in refused.json()["error"]["message"]
    assert '"tokens";q=30;w=60;qu="tokens"' in refused.headers["ratelimit-policy"]
    assert '"tokens";r=10' in refused.headers["ratelimit"]
    # More than a whole minute's worth can never pass: a 422 naming the limit, not a 429.
    too_many = submit(gateways[0], keys.FEW_TOKENS, max_new_tokens=31)
    assert too_many.status_code == 422
    assert "tokens_per_minute" in too_many.json()["error"]["message"]


def test_every_choice_of_an_openai_request_counts_as_a_job(gateways: list[str]) -> None:
    def complete(key: str, **fields: Any) -> httpx.Response:
        body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 1, **fields}
        return httpx.post(
            f"{gateways[0]}/v1/completions", json=body, headers=bearer(key), timeout=10
        )

    # Two choices of 20 tokens are more than the key's minute of 30: refused as a whole.
    too_many = complete(keys.FEW_TOKENS, n=2, max_tokens=20)
    assert too_many.status_code == 422
    assert "tokens_per_minute" in too_many.json()["error"]["message"]
    refused = complete(keys.FEW_JOBS, n=keys.CONCURRENT + 1)
    assert refused.status_code == 429
    assert "GENQ_RATE_LIMIT_CONCURRENT" in refused.json()["error"]["message"]
    # As many choices as the limit are let in; leaving the stream lets go of every job.
    headers = bearer(keys.FEW_JOBS)
    body = {"model": "default", "prompt": "x", "n": keys.CONCURRENT, "stream": True}
    with httpx.stream(
        "POST", f"{gateways[0]}/v1/completions", json=body, headers=headers, timeout=10
    ) as resp:
        assert resp.status_code == 200
        job_ids = resp.headers["x-genq-job-id"].split(", ")
    assert [finished(gateways[0], keys.FEW_JOBS, j)["status"] for j in job_ids] == [
        "cancelled"
    ] * keys.CONCURRENT


def test_concurrent_jobs_hold_across_gateways_until_one_ends(gateways: list[str]) -> None:
    first, second = (submit(base, keys.FEW_JOBS).json()["id"] for base in gateways)
    refused = submit(gateways[0], keys.FEW_JOBS)
    assert refused.status_code == 429
    assert "GENQ_RATE_LIMIT_CONCURRENT" in refused.json()["error"]["message"]
    assert '"concurrent";q=2;qu="concurrent-requests"' in refused.headers["ratelimit-policy"]
    assert refused.headers["retry-after"] == "1"
    # Cancelling a queued job ends it, and frees its slot on every gateway.
    cancel = httpx.delete(f"{gateways[1]}/v1/jobs/{first}", headers=bearer(keys.FEW_JOBS))
    assert cancel.json()["status"] == "cancelled"
    assert submit(gateways[0], keys.FEW_JOBS).status_code == 202
    # The second job still holds its slot: with the new one, the key is at its limit again.
    held = httpx.get(f"{gateways[0]}/v1/jobs/{second}", headers=bearer(keys.FEW_JOBS))
    assert held.json()["status"] == "queued"
    assert submit(gateways[1], keys.FEW_JOBS).status_code == 429


def test_rate_limit_headers_come_before_a_streams_first_byte(gateways: list[str]) -> None:
    body = {"prompt": "Stream me", "max_new_tokens": 1, "stream": True}
    headers = bearer(keys.ALICE)
    # No worker: the stream never sends an event, yet its headers are already there.
    with httpx.stream(
        "POST", f"{gateways[0]}/v1/generate", json=body, headers=headers, timeout=10
    ) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert '"requests";q=600;w=60' in resp.headers["ratelimit-policy"]
        assert '"requests";r=' in resp.headers["ratelimit"]


# --- Inputs -----------------------------------------------------------------------------------


def test_a_chunked_body_over_the_limit_is_413(keyed: KeyedStack) -> None:
    chunk = b'{"prompt": "' + b"x" * 65_536

    def body() -> Iterator[bytes]:
        yield chunk
        for _ in range(40):  # 2.6 MB, no Content-Length: sent chunked
            yield b"x" * 65_536

    resp = httpx.post(
        f"{keyed.base}/v1/jobs",
        content=body(),
        headers={**bearer(keys.ALICE), "content-type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 413
    limit = Settings().max_body_bytes
    assert resp.json()["error"]["message"] == (
        f"request body over {limit} bytes (GENQ_MAX_BODY_BYTES)"
    )


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"prompt": "\\ud800"}', "surrogate"),
        (b'{"prompt": "x", "temperature": NaN}', "expected a JSON value"),
        (b'{"prompt": "x", "temperature": Infinity}', "expected a JSON value"),
        (b'{"prompt": "x", "seed": 1e400}', "infinity"),
        (b'{"prompt": "x", "max_new_tokens": ' + b"9" * 5000 + b"}", "infinity"),
        (b'{"prompt": "x", "stop": ' + b"[" * 2000 + b"]" * 2000 + b"}", "depth limit"),
        (b'{"prompt": "x", "seed": 99999999999999999999999}', "valid integer"),
    ],
)
def test_hostile_json_is_a_422_that_says_why(keyed: KeyedStack, body: bytes, reason: str) -> None:
    headers = {**bearer(keys.ALICE), "content-type": "application/json"}
    resp = httpx.post(f"{keyed.base}/v1/jobs", content=body, headers=headers)
    assert resp.status_code == 422, resp.text
    assert reason in resp.json()["error"]["message"]


def test_odd_headers_are_no_500(keyed: KeyedStack) -> None:
    auth = (b"authorization", f"Bearer {keys.ALICE}".encode())
    for header in [
        (b"idempotency-key", b"\xff\xfe order"),
        (b"last-event-id", b"\x7f\xff"),
        (b"x-request-id", "é".encode() * 300),
        (b"x-api-key", b"\xff\xfe"),
    ]:
        for path in ("/v1/jobs", "/v1/generate"):
            resp = httpx.post(
                f"{keyed.base}{path}",
                json={"prompt": "x", "max_new_tokens": 1},
                headers=[auth, header],
                timeout=30,
            )
            assert resp.status_code < 500, (header, resp.text)


# --- Hosts, CORS and headers ------------------------------------------------------------------


def test_a_rebinding_host_header_is_refused(keyed: KeyedStack) -> None:
    port = keyed.base.rsplit(":", 1)[1]
    for host, status in [
        ("attacker.example.com", 400),
        (f"attacker.example.com:{port}", 400),
        (f"localhost:{port}", 200),
        (f"[::1]:{port}", 200),
    ]:
        resp = httpx.get(f"{keyed.base}/healthz", headers={"Host": host})
        assert resp.status_code == status, host
    assert resp.status_code == 200
    refused = httpx.get(f"{keyed.base}/healthz", headers={"Host": "attacker.example.com"})
    assert refused.json()["error"]["code"] == "host_not_allowed"


def test_a_cors_preflight_is_allowed_for_configured_origins_only(keyed: KeyedStack) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    allowed = httpx.options(f"{keyed.base}/v1/jobs", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-credentials" not in allowed.headers
    refused = httpx.options(
        f"{keyed.base}/v1/jobs", headers={"Origin": "https://evil.example", **preflight}
    )
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers


def test_answers_carry_security_headers(keyed: KeyedStack) -> None:
    resp = httpx.get(f"{keyed.base}/v1/models", headers=bearer(keys.ALICE))
    assert resp.headers["x-content-type-options"] == "nosniff"
    assert resp.headers["x-frame-options"] == "DENY"
    assert resp.headers["referrer-policy"] == "no-referrer"
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers["content-security-policy"].startswith("default-src 'none'")


# --- No leaks ---------------------------------------------------------------------------------


def test_readyz_says_redis_is_unreachable_and_nothing_more(tmp_path: Path, log_dir: Path) -> None:
    with running_stack(tmp_path, log_dir, False, serve=None) as (server, base, _):
        server.stop()
        resp = httpx.get(f"{base}/readyz", timeout=10)
    assert resp.status_code == 503
    assert resp.json()["error"]["message"] == "redis unreachable"
    assert str(server.port) not in resp.text
