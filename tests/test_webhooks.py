"""Webhooks: signed deliveries of finished jobs, retried with backoff, logged on the job."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trustme
from arq.worker import Retry
from pydantic import SecretStr
from redis.asyncio import Redis

from common.jobs import Job, JobStatus, WebhookDelivery
from common.jobstore import JobStore
from common.settings import Settings
from common.webhooks import WebhookPolicy, WebhookRefused, sign, verify_signature
from tests.conftest import WEBHOOK_RECEIVER_HOST, WEBHOOK_SECRET, Stack
from worker.webhooks import WebhookSender, deliver_webhook, resolve


@dataclass
class Receiver:
    """A webhook receiver on loopback that fails its first `failures` deliveries."""

    failures: int
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""


@contextmanager
def receiving(
    host: str, tls: ssl.SSLContext | None = None, failures: int = 1
) -> Iterator[Receiver]:
    """A receiver on `host`, over https with the certificate of `tls` if given."""
    state = Receiver(failures=failures)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            state.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
            failing = len(state.received) <= state.failures
            self.send_response(500 if failing else 204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    scheme = "http" if tls is None else "https"
    state.url = f"{scheme}://{host}:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving(WEBHOOK_RECEIVER_HOST) as state:
        yield state


def deliveries(stack: Stack, url: str, count: int) -> dict[str, Any]:
    """The job of a request with webhook `url`, once it logged `count` delivery attempts."""
    with httpx.Client(base_url=stack.base, timeout=30) as client:
        body = {"prompt": "Hello", "max_new_tokens": 5, "webhook": url}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 30
        while len((job := client.get(f"/v1/jobs/{job_id}").json())["webhook_deliveries"]) < count:
            assert time.monotonic() < deadline, f"deliveries so far: {job['webhook_deliveries']}"
            time.sleep(0.1)
    assert isinstance(job, dict)
    return job


def test_webhook_is_signed_retried_and_logged(stack: Stack, receiver: Receiver) -> None:
    job = deliveries(stack, receiver.url, 2)
    job_id = job["id"]
    first, second = job["webhook_deliveries"]
    assert first == {"attempt": 1, "at": first["at"], "delivered": False, "status_code": 500}
    assert (second["delivered"], second["status_code"], second["attempt"]) == (True, 204, 2)
    headers, payload = receiver.received[-1]
    signature = headers["x-genq-signature"]
    assert verify_signature(WEBHOOK_SECRET.encode(), signature, payload, now=time.time())
    assert headers["host"] == receiver.url.split("/")[2]
    delivered = orjson.loads(payload)
    assert delivered["id"] == job_id
    assert delivered["status"] == "succeeded"
    assert delivered["result"] == job["result"]


def test_webhook_outside_the_allow_list_is_refused(stack: Stack) -> None:
    body = {"prompt": "Hello", "webhook": "http://example.com/hook"}
    resp = httpx.post(f"{stack.base}/v1/jobs", json=body, timeout=10)
    assert resp.status_code == 422
    assert "GENQ_WEBHOOK_ALLOWED_HOSTS" in resp.json()["error"]["message"]


def test_a_name_that_resolves_to_a_private_address_is_not_delivered_to(stack: Stack) -> None:
    # `localhost` is allowed by name, but resolves to loopback addresses the list does not
    # name; a receiver listens there, and would get the delivery were it not refused.
    with receiving("127.0.0.1") as receiver:
        url = receiver.url.replace("127.0.0.1", "localhost")
        job = deliveries(stack, url, 2)
    first, second = job["webhook_deliveries"]
    # The job shows no reason: a refused target looks like one that did not answer.
    assert first == {"attempt": 1, "at": first["at"], "delivered": False, "status_code": None}
    assert (second["delivered"], second["status_code"]) == (False, None)
    assert receiver.received == []


def serving_as(ca: trustme.CA, name: str) -> ssl.SSLContext:
    """A server's TLS context, with a certificate of `ca` for `name` alone."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(name).configure_cert(context)
    return context


async def https_delivery(redis: Redis, tmp_path: Path, certified: str) -> tuple[str, Job, Receiver]:
    """One attempt of a worker's delivery to `https://localhost:<port>/hook`, whose receiver
    holds a certificate for `certified` from a CA the worker is told to trust; `localhost`
    resolves to loopback, so only the addresses it resolves to are allowed (which the worker
    pins the connection to). Returns the attempt's outcome (`retried` if it failed), the job as
    recorded after it, and the receiver."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    addresses = await resolve("localhost", 443)
    settings = Settings(
        webhook_allowed_hosts=["localhost:*", *(str(a) for a in addresses)],
        webhook_secret=SecretStr(WEBHOOK_SECRET),
        webhook_ca_file=ca_file,
    )
    store = JobStore(redis, ttl_s=60, events_maxlen=100)
    job = Job(id="hook-tls", status=JobStatus.succeeded, model="m", created_at=time.time())
    await store.create(job, pool="p", owner="o")
    sender = WebhookSender(store, settings)
    try:
        with receiving(str(addresses[0]), serving_as(ca, certified), failures=0) as receiver:
            port = receiver.url.rsplit(":", 1)[1].split("/")[0]
            receiver.url = f"https://localhost:{port}/hook"
            context = {"webhooks": sender, "job_try": 1}
            try:
                outcome = await deliver_webhook(context, job.id, receiver.url)
            except Retry:
                outcome = "retried"
    finally:
        await sender.close()
    recorded = await store.load(job.id)
    assert recorded is not None
    return outcome, recorded, receiver


async def test_an_https_webhook_is_pinned_and_its_certificate_checked_by_name(
    redis: Redis, tmp_path: Path
) -> None:
    outcome, job, receiver = await https_delivery(redis, tmp_path, "localhost")
    assert outcome == "delivered"
    (delivery,) = job.webhook_deliveries
    assert delivery == WebhookDelivery(attempt=1, at=delivery.at, delivered=True, status_code=204)
    ((headers, payload),) = receiver.received
    assert headers["host"] == receiver.url.split("/")[2]
    assert orjson.loads(payload)["id"] == job.id


@pytest.mark.parametrize("other", ["hooks.example.com", "127.0.0.1"])
async def test_an_https_webhook_to_a_certificate_of_another_name_is_not_delivered(
    redis: Redis, tmp_path: Path, other: str
) -> None:
    # The pinned address (127.0.0.1) is no better than another name: the URL named localhost.
    outcome, job, receiver = await https_delivery(redis, tmp_path, other)
    assert outcome == "retried"
    (delivery,) = job.webhook_deliveries
    assert delivery == WebhookDelivery(attempt=1, at=delivery.at, delivered=False, status_code=None)
    assert receiver.received == []


def policy(*allowed: str, allow_http: bool = False) -> WebhookPolicy:
    return WebhookPolicy(list(allowed), allow_http=allow_http)


def test_webhooks_need_https_unless_http_is_allowed() -> None:
    with pytest.raises(WebhookRefused, match="GENQ_WEBHOOK_ALLOW_HTTP"):
        policy("hooks.example.com").check_url("http://hooks.example.com/x")
    assert policy("hooks.example.com:80", allow_http=True).check_url("http://hooks.example.com/x")
    with pytest.raises(WebhookRefused, match="scheme"):
        policy("hooks.example.com").check_url("ftp://hooks.example.com/x")


def test_webhook_ports_come_from_the_allow_list() -> None:
    named = policy("hooks.example.com", "other.example.com:8443", "any.example.com:*")
    assert named.check_url("https://hooks.example.com/x").port == 443
    assert named.check_url("https://other.example.com:8443/x").port == 8443
    assert named.check_url("https://any.example.com:9999/x").port == 9999
    for url in ("https://hooks.example.com:8443/x", "https://other.example.com/x"):
        with pytest.raises(WebhookRefused, match="GENQ_WEBHOOK_ALLOWED_HOSTS"):
            named.check_url(url)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.100.100.200",  # a metadata service in the shared range
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fd00:ec2::254",  # IPv6 metadata
        "fe80::1",
        "::ffff:127.0.0.1",
    ],
)
def test_a_target_resolving_to_a_non_public_address_is_refused(address: str) -> None:
    with pytest.raises(WebhookRefused, match="not a public address"):
        policy("hooks.example.com").check_addresses([ip_address(address)])


def test_a_public_address_or_one_the_allow_list_names_is_accepted() -> None:
    policy("hooks.example.com").check_addresses([ip_address("93.184.216.34")])
    policy("hooks.example.com", "10.0.0.0/24").check_addresses([ip_address("10.0.0.7")])
    # One bad address among good ones is enough to refuse: the connection could use it.
    with pytest.raises(WebhookRefused):
        policy("hooks.example.com").check_addresses(
            [ip_address("93.184.216.34"), ip_address("10.0.0.7")]
        )


def test_a_replayed_or_tampered_delivery_fails_verification() -> None:
    secret, body, sent = b"s3cret", b'{"id": "j"}', 1_700_000_000
    header = sign(secret, body, sent)
    assert verify_signature(secret, header, body, now=sent + 10)
    assert not verify_signature(secret, header, body, now=sent + 301)  # replayed later
    assert not verify_signature(secret, header, b'{"id": "k"}', now=sent)  # another body
    later = header.replace(f"t={sent}", f"t={sent + 1000}")  # a fresh time on an old MAC
    assert not verify_signature(secret, later, body, now=sent + 1000)
    assert not verify_signature(b"other", header, body, now=sent)
