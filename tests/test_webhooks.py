"""Webhooks: signed deliveries of finished jobs, retried with backoff, logged on the job."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import orjson
import pytest

from tests.conftest import WEBHOOK_SECRET, Stack


@dataclass
class Receiver:
    """A webhook receiver on loopback that fails its first `failures` deliveries."""

    failures: int
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(failures=1)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            state.received.append((dict(self.headers), body))
            failing = len(state.received) <= state.failures
            self.send_response(500 if failing else 204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()


def test_webhook_is_signed_retried_and_logged(stack: Stack, receiver: Receiver) -> None:
    with httpx.Client(base_url=stack.base, timeout=30) as client:
        body = {"prompt": "Hello", "max_new_tokens": 5, "webhook": receiver.url}
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 30
        while len((job := client.get(f"/v1/jobs/{job_id}").json())["webhook_deliveries"]) < 2:
            assert time.monotonic() < deadline, f"deliveries so far: {job['webhook_deliveries']}"
            time.sleep(0.1)
    first, second = job["webhook_deliveries"]
    assert (first["delivered"], first["status_code"], first["attempt"]) == (False, 500, 1)
    assert (second["delivered"], second["status_code"], second["attempt"]) == (True, 204, 2)
    headers, payload = receiver.received[-1]
    expected = hmac.new(WEBHOOK_SECRET.encode(), payload, hashlib.sha256).hexdigest()
    assert headers["X-Genq-Signature"] == f"sha256={expected}"
    delivered = orjson.loads(payload)
    assert delivered["id"] == job_id
    assert delivered["status"] == "succeeded"
    assert delivered["result"] == job["result"]


def test_webhook_outside_the_allow_list_is_refused(stack: Stack) -> None:
    body = {"prompt": "Hello", "webhook": "http://example.com/hook"}
    resp = httpx.post(f"{stack.base}/v1/jobs", json=body, timeout=10)
    assert resp.status_code == 422
    assert "GENQ_WEBHOOK_ALLOWED_HOSTS" in resp.json()["error"]["message"]
