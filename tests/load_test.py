"""Load test: locust users that call genq the way its clients do, and check every answer.

    make load HOST=http://127.0.0.1:8000 USERS=16 TIME=60s
    locust -f tests/load_test.py --headless --host http://127.0.0.1:8000 -u 16 -r 4 -t 60s \\
        --prompts mixed --max-new-tokens 16-64 [--api-key KEY] [SyncUser OpenAIStreamUser ...]

The users (all of them by default, or the classes named on the command line):
- SubmitPollUser: `POST /v1/jobs`, then `GET /v1/jobs/{id}` until the job ends;
- SyncUser: `POST /v1/generate`;
- StreamUser: `POST /v1/jobs`, then its SSE events; it drops the stream after a few tokens and
  resumes with `Last-Event-ID`, as a client whose connection broke;
- OpenAIStreamUser: `POST /v1/chat/completions` with `stream: true`, usage included;
- BatchUser: `POST /v1/jobs/batch` of four requests, then polls them.

Every request asks for `ignore_eos`, so each answer must hold exactly the tokens it asked for: a
wrong status, an empty or short answer, a stream whose token indexes skip or repeat, or a stream
whose text is not the result's, is a failure. Streams also report time to first token (`TTFT`)
and inter-token latency (`ITL`) as entries of their own in locust's statistics, in ms.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from typing import Any

from locust import HttpUser, between, events, task
from locust.argument_parser import LocustArgumentParser
from locust.env import Environment
from sseclient import SSEClient

SHORT = ["Hi!", "Name a colour.", "What is 2 + 2?", "Say hello in French."]
LONG = [
    "Explain, step by step and with one concrete example, how {topic} works, and what a "
    "student usually gets wrong about it. Keep the answer plain and precise."
]
TOPICS = ["rainbows", "compilers", "vaccines", "tides", "bread dough", "the water cycle"]
FINISHED = ("succeeded", "failed", "cancelled")


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]  # locust's hooks
def _arguments(parser: LocustArgumentParser) -> None:
    parser.add_argument("--prompts", choices=["short", "long", "chat", "mixed"], default="mixed")
    parser.add_argument(
        "--max-new-tokens", default="16-64", help="tokens per request: N, or a range LOW-HIGH"
    )
    parser.add_argument("--api-key", default="", help="sent as Authorization: Bearer")


def _record(kind: str, name: str, ms: float, error: Exception | None) -> None:
    """An entry of locust's statistics that is not an HTTP request: a failed check of an answer,
    or a stream's time to first token and inter-token latency."""
    events.request.fire(  # type: ignore[no-untyped-call]  # locust's hooks are untyped
        request_type=kind, name=name, response_time=ms, response_length=0, exception=error
    )


class Workload:
    """What the users ask for, from the command line."""

    def __init__(self, environment: Environment) -> None:
        options = environment.parsed_options
        self.prompts = options.prompts if options else "mixed"
        low, _, high = (options.max_new_tokens if options else "16-64").partition("-")
        self.tokens = (int(low), int(high or low))
        key = options.api_key if options else ""
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def body(self) -> dict[str, Any]:
        """A native generation request: a fresh prompt (never a cache hit), exact length."""
        kind = random.choice(["short", "long", "chat"]) if self.prompts == "mixed" else self.prompts
        tag = uuid.uuid4().hex[:8]
        if kind == "short":
            text = f"{random.choice(SHORT)} ({tag})"
        else:
            text = f"{random.choice(LONG).format(topic=random.choice(TOPICS))} ({tag})"
        body: dict[str, Any] = {
            "max_new_tokens": random.randint(*self.tokens),
            "temperature": 0.7,
            "ignore_eos": True,
        }
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        return body


class GenqUser(HttpUser):
    abstract = True
    wait_time = between(0, 0.1)

    def on_start(self) -> None:
        self.work = Workload(self.environment)
        self.client.headers.update(self.work.headers)

    def fail(self, name: str, message: str) -> None:
        _record("CHECK", name, 0.0, AssertionError(message))

    def token_came(self, name: str, started: float, previous: float | None) -> float:
        """A streamed token's time to first token (the first) or inter-token latency; when."""
        now = time.monotonic()
        if previous is None:
            _record("TTFT", name, (now - started) * 1000, None)
        else:
            _record("ITL", name, (now - previous) * 1000, None)
        return now

    def check_job(self, name: str, job: dict[str, Any], asked: int) -> bool:
        """A finished job holds exactly the tokens it asked for."""
        if job.get("status") != "succeeded":
            self.fail(name, f"job {job.get('id')} ended {job.get('status')}: {job.get('error')}")
            return False
        result = job["result"]
        if not result["text"] or result["usage"]["completion_tokens"] != asked:
            self.fail(name, f"job {job['id']}: {result['usage']} for {asked} tokens asked")
            return False
        return True

    def submit(self, body: dict[str, Any]) -> str | None:
        with self.client.post("/v1/jobs", json=body, catch_response=True) as resp:
            if resp.status_code != 202:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return None
            job_id: str = resp.json()["id"]
            return job_id

    def poll(self, job_id: str, timeout_s: float = 300) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            resp = self.client.get(f"/v1/jobs/{job_id}", name="/v1/jobs/{id}")
            if resp.status_code != 200:
                return None
            job: dict[str, Any] = resp.json()
            if job["status"] in FINISHED:
                return job
            time.sleep(0.2)
        self.fail("/v1/jobs/{id}", f"job {job_id} did not end in {timeout_s} s")
        return None


class SubmitPollUser(GenqUser):
    @task
    def submit_and_poll(self) -> None:
        body = self.work.body()
        job_id = self.submit(body)
        if job_id is not None and (job := self.poll(job_id)) is not None:
            self.check_job("/v1/jobs", job, body["max_new_tokens"])


class SyncUser(GenqUser):
    @task
    def generate(self) -> None:
        body = {**self.work.body(), "timeout_s": 300}
        with self.client.post("/v1/generate", json=body, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return
            self.check_job("/v1/generate", resp.json(), body["max_new_tokens"])


class StreamUser(GenqUser):
    @task
    def stream_with_a_resume(self) -> None:
        body = self.work.body()
        job_id = self.submit(body)
        if job_id is None:
            return
        name = "/v1/jobs/{id}/events"
        indexes: list[int] = []
        text = ""
        last = ""
        started = time.monotonic()
        previous = None
        drop_after = random.randint(1, 4)  # the connection breaks after a few tokens, once
        final: dict[str, Any] | None = None
        while final is None and time.monotonic() - started < 300:
            headers = {"Last-Event-ID": last} if last else {}
            with self.client.get(
                f"/v1/jobs/{job_id}/events",
                headers=headers,
                stream=True,
                name=name,
                catch_response=True,
            ) as resp:
                if resp.status_code != 200:
                    resp.failure(f"{resp.status_code} on the stream of {job_id}")
                    return
                # chunk_size=None: each chunk as it comes, not fixed-size reads that wait
                for event in SSEClient(resp.iter_content(chunk_size=None)).events():
                    payload = json.loads(event.data)
                    if event.event == "error" and "status" not in payload:
                        break  # a resumable break: reconnect after `last`
                    last = event.id or ""
                    if event.event != "token":
                        final = payload
                        break
                    previous = self.token_came(name, started, previous)
                    indexes.append(payload["index"])
                    text += payload["text"]
                    if len(indexes) == drop_after:
                        drop_after = -1
                        break
        if final is None:
            self.fail(name, f"the stream of {job_id} never ended")
        elif indexes != list(range(len(indexes))):
            self.fail(name, f"job {job_id}: token indexes {indexes[:20]}...")
        elif (
            self.check_job(name, final, body["max_new_tokens"]) and text != final["result"]["text"]
        ):
            self.fail(name, f"job {job_id}: the streamed text is not the result")


class OpenAIStreamUser(GenqUser):
    @task
    def chat_stream(self) -> None:
        body = self.work.body()
        messages = body.get("messages") or [{"role": "user", "content": body["prompt"]}]
        request = {
            "model": "default",
            "messages": messages,
            "max_completion_tokens": body["max_new_tokens"],
            "temperature": body["temperature"],
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        name = "/v1/chat/completions (stream)"
        started = time.monotonic()
        previous = None
        text = ""
        usage = None
        done = False
        with self.client.post(
            "/v1/chat/completions", json=request, stream=True, name=name, catch_response=True
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return
            for event in SSEClient(resp.iter_content(chunk_size=None)).events():
                if event.data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(event.data)
                if "error" in chunk:
                    resp.failure(f"error chunk: {chunk['error']}")
                    return
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices", []):
                    if content := choice["delta"].get("content"):
                        previous = self.token_came(name, started, previous)
                        text += content
            if not done or usage is None or not text:
                resp.failure(f"stream ended early: done={done}, usage={usage}, text={text!r}")
            elif usage["completion_tokens"] != body["max_new_tokens"]:
                resp.failure(f"{usage['completion_tokens']} tokens, {body['max_new_tokens']} asked")


class BatchUser(GenqUser):
    @task
    def batch(self) -> None:
        bodies = [self.work.body() for _ in range(4)]
        with self.client.post(
            "/v1/jobs/batch", json={"requests": bodies}, catch_response=True
        ) as resp:
            if resp.status_code != 202:
                resp.failure(f"{resp.status_code}: {resp.text[:200]}")
                return
            items = resp.json()["items"]
            if any(item["job"] is None for item in items):
                resp.failure(f"items refused: {[i['error'] for i in items if i['error']]}")
                return
        for item, body in zip(items, bodies, strict=True):
            if (job := self.poll(item["job"]["id"])) is not None:
                self.check_job("/v1/jobs/batch", job, body["max_new_tokens"])
