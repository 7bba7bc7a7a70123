"""The public HTTP contract, against a running gateway and worker (tiny model, real Redis)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from httpx_sse import connect_sse

from tests.conftest import TINY_KEY, TINY_NAME, Stack
from tests.scrape import scrape
from tests.sse import read_stream, token_text


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base, timeout=30) as c:
        yield c


# A stop string the tiny model never writes: it changes a request (no cache hit), not its text.
NEVER = "\u00a7\u00a7\u00a7"


def submit(client: httpx.Client, **body: Any) -> dict[str, Any]:
    resp = client.post("/v1/jobs", json={"prompt": "Once upon a time", **body})
    assert resp.status_code == 202, resp.text
    job: dict[str, Any] = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    return job


def poll(client: httpx.Client, job_id: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_submit_then_poll_until_succeeded(client: httpx.Client) -> None:
    job = submit(client, prompt="Poll me", max_new_tokens=12, temperature=0)
    assert job["status"] == "queued"
    assert job["model"] == TINY_KEY
    done = poll(client, job["id"])
    assert done["status"] == "succeeded"
    assert done["result"]["finish_reason"] in ("length", "stop")
    assert done["result"]["usage"]["completion_tokens"] <= 12
    assert done["result"]["usage"]["prompt_tokens"] > 0
    assert done["timings"]["total_s"] >= done["timings"]["generation_s"] > 0
    assert done["attempt"] == 1


def test_sync_generate_returns_the_finished_job(client: httpx.Client) -> None:
    resp = client.post(
        "/v1/generate", json={"prompt": "Hello", "max_new_tokens": 8, "temperature": 0}
    )
    assert resp.status_code == 200
    assert resp.json()["status"] == "succeeded"


def test_sync_generate_answers_202_when_the_job_outlives_the_timeout(
    client: httpx.Client,
) -> None:
    resp = client.post(
        "/v1/generate",
        json={"prompt": "Hello", "max_new_tokens": 200, "timeout_s": 0.01, "temperature": 0},
    )
    assert resp.status_code == 202
    job = resp.json()
    assert job["status"] in ("queued", "running")
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}"
    assert poll(client, job["id"])["status"] == "succeeded"


def test_greedy_is_deterministic_across_jobs(client: httpx.Client) -> None:
    body = {"prompt": "The capital of France is", "max_new_tokens": 16, "temperature": 0}
    first = client.post("/v1/generate", json=body).json()
    second = client.post("/v1/generate", json={**body, "stop": [NEVER]}).json()
    assert not second["cached"]  # a job of its own, not a cache hit
    assert first["result"]["text"] == second["result"]["text"]


def test_sse_events_are_ordered_with_ids_and_add_up_to_the_result(client: httpx.Client) -> None:
    job = submit(client, max_new_tokens=30, temperature=0.8, seed=5)
    events = read_stream(client, "GET", f"/v1/jobs/{job['id']}/events")
    assert [e.event for e in events[:-1]] == ["token"] * (len(events) - 1)
    assert events[-1].event == "done"
    ids = [e.id for e in events]
    assert all(ids)
    assert len(set(ids)) == len(ids)
    indexes = [orjson.loads(e.data)["index"] for e in events[:-1]]
    assert indexes == list(range(len(indexes)))
    final = orjson.loads(events[-1].data)
    assert final["status"] == "succeeded"
    assert token_text(events) == final["result"]["text"]


def test_last_event_id_resumes_after_that_event(client: httpx.Client) -> None:
    job = submit(client, max_new_tokens=20, temperature=0)
    everything = read_stream(client, "GET", f"/v1/jobs/{job['id']}/events")
    assert len(everything) > 4
    cut = everything[3].id
    rest = read_stream(
        client, "GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": cut}
    )
    assert [(e.id, e.event, e.data) for e in rest] == [
        (e.id, e.event, e.data) for e in everything[4:]
    ]


def test_streams_and_waits_of_a_finished_job_end_at_once(client: httpx.Client) -> None:
    body = {"prompt": "Finished already", "max_new_tokens": 5, "temperature": 0, "stop": [NEVER]}
    job = submit(client, **body)
    everything = read_stream(client, "GET", f"/v1/jobs/{job['id']}/events")
    assert everything[-1].event == "done"
    # No byte would come for 15 s (the ping): a stream or wait that blocks trips the timeout.
    with httpx.Client(base_url=client.base_url, timeout=3) as impatient:
        rest = read_stream(
            impatient,
            "GET",
            f"/v1/jobs/{job['id']}/events",
            headers={"Last-Event-ID": everything[-1].id},
        )
        again = impatient.post("/v1/generate", json=body)
    assert rest == []
    assert again.status_code == 200
    assert again.json()["id"] == job["id"]  # the identical request is served by the finished job


def test_generate_with_stream_true_answers_with_sse(client: httpx.Client) -> None:
    events = read_stream(
        client,
        "POST",
        "/v1/generate",
        json={"prompt": "Hello", "max_new_tokens": 10, "temperature": 0, "stream": True},
    )
    assert events[-1].event == "done"
    assert token_text(events) == orjson.loads(events[-1].data)["result"]["text"]


def test_stop_string_ends_generation_before_it(client: httpx.Client) -> None:
    body = {"prompt": "Once upon a time", "max_new_tokens": 30, "temperature": 0}
    full = client.post("/v1/generate", json=body).json()["result"]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"pick another prompt: no usable stop string in {full!r}"
    cut = client.post("/v1/generate", json={**body, "stop": [stop]}).json()["result"]
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == full[: full.index(stop)]


def test_chat_messages_are_accepted(client: httpx.Client) -> None:
    resp = client.post(
        "/v1/generate",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 5},
    )
    assert resp.json()["status"] == "succeeded"


def test_a_wrong_method_is_405_saying_which_are_allowed(client: httpx.Client) -> None:
    resp = client.put("/v1/jobs")
    assert resp.status_code == 405
    assert resp.json()["error"]["code"] == "method_not_allowed"
    assert resp.headers["allow"] == "POST"
    # A path of two routes allows the methods of both.
    assert client.put("/v1/jobs/nope").headers["allow"] == "DELETE, GET"


def schema_of(spec: dict[str, Any], model: str, field: str) -> dict[str, Any]:
    """A field's schema without its `null` branch."""
    found: dict[str, Any] = spec["components"]["schemas"][model]["properties"][field]
    branches: list[dict[str, Any]] = found.get("anyOf", [found])
    (branch,) = [b for b in branches if b.get("type") != "null"]
    return branch


def test_the_schema_declares_the_lengths_the_handlers_enforce(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert schema_of(spec, "GenerationRequest", "prompt")["minLength"] == 1
    assert schema_of(spec, "GenerationRequest", "messages")["minItems"] == 1
    assert schema_of(spec, "TokenizeChatRequest", "add_special_tokens")["const"] is False
    assert schema_of(spec, "TokenizeChatRequest", "add_generation_prompt")["const"] is True
    completion = spec["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"]
    assert all(b.get("minLength", b.get("minItems")) == 1 for b in completion["anyOf"])
    # ... and the handlers refuse what the schema refuses, as invalid requests.
    empty: list[dict[str, Any]] = [{"prompt": ""}, {"messages": []}]
    for route in ("/v1/jobs", "/v1/generate"):
        for body in empty:
            resp = client.post(route, json=body)
            assert resp.status_code == 422, (route, body)
            assert resp.json()["error"]["code"] == "invalid_request"
    prompts: list[object] = ["", [], [""], [[]]]
    for prompt in prompts:
        body = {"model": TINY_NAME, "prompt": prompt}
        assert client.post("/v1/completions", json=body).status_code == 422, body


def test_an_empty_last_event_id_streams_from_the_start(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    (header,) = [
        p
        for p in spec["paths"]["/v1/jobs/{job_id}/events"]["get"]["parameters"]
        if p["name"] == "last-event-id"
    ]
    assert header["schema"]["pattern"] == r"^(\d+-\d+)?$"
    job = submit(client, max_new_tokens=5, temperature=0)
    everything = read_stream(client, "GET", f"/v1/jobs/{job['id']}/events")
    again = read_stream(
        client, "GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": ""}
    )
    assert [(e.id, e.data) for e in again] == [(e.id, e.data) for e in everything]


def test_unknown_job_is_404_with_the_envelope(client: httpx.Client) -> None:
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/events"):
        resp = client.get(path)
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "job_not_found"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "x", "colour": "blue"}, "colour"),
        ({"prompt": "x", "temperature": 5}, "temperature"),
        ({"prompt": "x", "max_new_tokens": -1}, "max_new_tokens"),
        ({"prompt_token_ids": []}, "prompt_token_ids"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({}, "exactly one of"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one of"),
        ({"messages": [{"role": "wizard", "content": "y"}]}, "role"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": 3}, "prompt"),
    ],
)
def test_bad_fields_are_422_with_the_envelope(
    client: httpx.Client, body: dict[str, Any], needle: str
) -> None:
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["code"] == "invalid_request"
    assert needle in error["message"]


@pytest.mark.parametrize(
    ("body", "limit"),
    [
        ({"prompt": "x" * 40_000}, "GENQ_MAX_PROMPT_CHARS"),
        ({"prompt": "x", "max_new_tokens": 100_000}, "GENQ_MAX_NEW_TOKENS_LIMIT"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "GENQ_MAX_STOP_SEQUENCES"),
        ({"prompt": "x", "stop": ["z" * 100]}, "GENQ_MAX_STOP_CHARS"),
    ],
)
def test_limits_are_422_naming_the_limit(
    client: httpx.Client, body: dict[str, Any], limit: str
) -> None:
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "limit_exceeded"
    assert limit in resp.json()["error"]["message"]


def test_sync_timeout_over_the_limit_is_422(client: httpx.Client) -> None:
    resp = client.post("/v1/generate", json={"prompt": "x", "timeout_s": 10_000})
    assert resp.status_code == 422
    assert "GENQ_MAX_SYNC_TIMEOUT_S" in resp.json()["error"]["message"]


def test_oversized_body_is_413(client: httpx.Client) -> None:
    resp = client.post(
        "/v1/jobs",
        content=b'{"prompt": "' + b"x" * 1_100_000 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 413
    assert "GENQ_MAX_BODY_BYTES" in resp.json()["error"]["message"]


def test_malformed_json_and_bad_resume_id_are_422(client: httpx.Client) -> None:
    resp = client.post("/v1/jobs", content=b"{nope", headers={"content-type": "application/json"})
    assert resp.status_code == 422
    job = submit(client, max_new_tokens=2)
    resp = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "garbage"})
    assert resp.status_code == 422
    assert "Last-Event-ID" in resp.json()["error"]["message"]


def test_context_window_overflow_fails_the_job_with_a_reason(client: httpx.Client) -> None:
    job = client.post("/v1/generate", json={"prompt": "word " * 1100, "max_new_tokens": 10}).json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "context_length_exceeded"
    assert "context window" in job["error"]["message"]


def test_unknown_model_is_404_listing_the_served_ones(client: httpx.Client) -> None:
    resp = client.post("/v1/jobs", json={"prompt": "x", "model": "gpt-17"})
    assert resp.status_code == 404
    assert TINY_NAME in resp.json()["error"]["message"]


def test_models_lists_the_served_model_with_its_worker(client: httpx.Client) -> None:
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    (card,) = models["data"]
    assert card["id"] == TINY_NAME
    assert card["workers"] == 1
    assert card["aliases"] == ["default"]
    (version,) = card["versions"]
    assert version["id"] == TINY_KEY
    assert version["state"] == "ready"
    assert version["default"] is True
    assert len(version["workers"]) == 1


def test_models_say_how_each_worker_decodes(client: httpx.Client) -> None:
    # The engine sets up on its own thread; the next heartbeat carries what it chose.
    deadline = time.monotonic() + 30
    while True:
        (card,) = client.get("/v1/models").json()["data"]
        (holding,) = card["versions"][0]["workers"]
        if holding["decode"] is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    # The CPU keeps the eager path (GENQ_STATIC_DECODE=auto), as configured: no note.
    assert holding["decode"] == "eager"
    assert holding["decode_note"] is None


def test_queue_reports_pool_statistics(client: httpx.Client) -> None:
    (pool,) = client.get("/v1/queue").json()["pools"]
    assert pool["pool"] == "default"
    assert pool["workers_alive"] == 1
    assert pool["depth"] >= pool["ready"] >= 0


def test_probes_metrics_and_docs(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    metrics = client.get("/metrics").text
    assert "genq_jobs_submitted_total" in metrics
    assert 'genq_workers_alive{pool="default"} 1.0' in metrics
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/generate", "/v1/queue"} <= set(spec["paths"])


def test_worker_exposes_engine_and_memory_metrics(client: httpx.Client, stack: Stack) -> None:
    client.post("/v1/generate", json={"prompt": "Hello", "max_new_tokens": 4})
    metrics = scrape(stack.worker_metrics)
    model = {"pool": "default", "model": TINY_KEY}
    assert metrics.value("genq_worker_model_loads_total", **model, outcome="loaded") == 1
    assert metrics.value("genq_worker_model_bytes", **model) > 0
    assert metrics.value("genq_worker_rss_bytes", pool="default") > 0
    assert metrics.value("genq_generation_tokens_total", **model) > 0
    assert metrics.has("genq_requests_running", **model)
    assert metrics.has("genq_time_to_first_token_seconds_bucket", **model)


def test_concurrent_jobs_are_batched_and_match_their_solo_results(client: httpx.Client) -> None:
    prompts = ["Hello", "The capital of France is", "Once upon a time there", "a b c", "x y"]
    body = {"max_new_tokens": 24, "temperature": 0}
    solo = [
        client.post("/v1/generate", json={"prompt": p, **body}).json()["result"]["text"]
        for p in prompts
    ]
    jobs = [submit(client, prompt=p, stop=[NEVER], **body) for p in prompts]
    batched = [poll(client, j["id"])["result"]["text"] for j in jobs]
    assert batched == solo


def test_cancelling_a_running_job_stops_it_and_spares_the_others(client: httpx.Client) -> None:
    # Long enough (seconds on the tiny model) for the cancel to land mid-generation.
    body = {"max_new_tokens": 900, "temperature": 0}
    prompts = ["Once", "Hello", "The capital"]
    solo = {p: client.post("/v1/generate", json={"prompt": p, **body}).json() for p in prompts}
    jobs = [submit(client, prompt=p, stop=[NEVER], **body) for p in prompts]
    victim = jobs[0]["id"]
    with connect_sse(client, "GET", f"/v1/jobs/{victim}/events") as source:
        assert next(source.iter_sse()).event == "token"  # it is running
    cancelled = client.delete(f"/v1/jobs/{victim}").json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["result"]["finish_reason"] == "cancelled"
    assert cancelled["result"]["usage"]["completion_tokens"] < 900
    events = read_stream(client, "GET", f"/v1/jobs/{victim}/events")
    assert events[-1].event == "done"
    assert token_text(events) == cancelled["result"]["text"]
    assert solo["Once"]["result"]["text"].startswith(cancelled["result"]["text"])
    for job, prompt in zip(jobs[1:], prompts[1:], strict=True):
        assert poll(client, job["id"])["result"] == solo[prompt]["result"]


def test_batch_submit_runs_valid_items_and_reports_bad_ones(client: httpx.Client) -> None:
    items = [
        {"prompt": "Hello", "max_new_tokens": 5, "stop": [NEVER, "b"]},
        {"prompt": "Hello", "temperature": 7},
        {"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 5},
        {"prompt": "Hello", "model": "gpt-17"},
    ]
    resp = client.post("/v1/jobs/batch", json={"requests": items})
    assert resp.status_code == 202
    out = resp.json()["items"]
    assert [i["index"] for i in out] == [0, 1, 2, 3]
    assert out[1]["job"] is None
    assert out[1]["error"]["code"] == "invalid_request"
    assert "temperature" in out[1]["error"]["message"]
    assert out[3]["error"]["code"] == "model_not_found"
    for item in (out[0], out[2]):
        assert item["error"] is None
        assert poll(client, item["job"]["id"])["status"] == "succeeded"
    too_many = client.post("/v1/jobs/batch", json={"requests": [{"prompt": "x"}] * 101})
    assert too_many.status_code == 422
    assert "GENQ_MAX_BATCH_REQUESTS" in too_many.json()["error"]["message"]


def test_idempotency_key_returns_the_same_job_and_conflicts_on_another_body(
    client: httpx.Client,
) -> None:
    key = {"Idempotency-Key": f"order-{time.time_ns()}"}
    body = {"prompt": "Hello", "max_new_tokens": 6, "temperature": 0.5}
    first = client.post("/v1/jobs", json=body, headers=key).json()
    again = client.post("/v1/jobs", json=body, headers=key).json()
    assert again["id"] == first["id"]
    synced = client.post("/v1/generate", json=body, headers=key)
    assert synced.status_code == 200
    assert synced.json()["id"] == first["id"]  # the sync route attaches to it
    conflict = client.post("/v1/jobs", json={**body, "max_new_tokens": 7}, headers=key)
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_conflict"


def test_identical_deterministic_requests_share_one_job(client: httpx.Client) -> None:
    body = {"prompt": "Cache me", "max_new_tokens": 120, "temperature": 0}
    first = submit(client, **body)
    twin = submit(client, **body)  # arrives while the first is queued or running
    assert twin["id"] == first["id"]
    assert twin["cached"] is True
    done = poll(client, first["id"])
    later = client.post("/v1/generate", json=body).json()
    assert later["id"] == first["id"]
    assert later["cached"] is True
    assert later["result"] == done["result"]
    sampled = {**body, "temperature": 0.9}  # no seed: not deterministic, never shared
    assert submit(client, **sampled)["id"] != submit(client, **sampled)["id"]


def test_an_idempotency_key_answered_from_the_cache_gives_that_answer_again(
    client: httpx.Client,
) -> None:
    body = {"prompt": "Cached answer", "max_new_tokens": 6, "temperature": 0}
    done = poll(client, submit(client, **body)["id"])
    key = {"Idempotency-Key": f"retry-{time.time_ns()}"}
    first = client.post("/v1/jobs", json=body, headers=key)
    retry = client.post("/v1/jobs", json=body, headers=key)
    assert first.status_code == retry.status_code == 202
    assert first.json()["id"] == retry.json()["id"] == done["id"]
    assert first.json()["cached"] is retry.json()["cached"] is True


def test_a_shared_job_is_cancelled_only_when_its_last_client_lets_go(
    client: httpx.Client,
) -> None:
    body = {"prompt": "Shared", "max_new_tokens": 900, "temperature": 0, "stop": [NEVER]}
    first = submit(client, **body)
    twin = submit(client, **body)
    assert twin["id"] == first["id"]
    with connect_sse(client, "GET", f"/v1/jobs/{first['id']}/events") as source:
        events = source.iter_sse()
        assert next(events).event == "token"  # it is running
        assert client.delete(f"/v1/jobs/{first['id']}").json()["status"] == "running"
        # The twin still holds it: it goes on generating.
        assert [next(events).event for _ in range(50)] == ["token"] * 50
    cancelled = client.delete(f"/v1/jobs/{first['id']}").json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["result"]["usage"]["completion_tokens"] < 900


def test_a_near_zero_temperature_is_greedy_and_spares_the_batch(client: httpx.Client) -> None:
    body = {"prompt": "Once upon a time", "max_new_tokens": 40, "stop": [NEVER]}
    greedy = client.post("/v1/generate", json={**body, "temperature": 0}).json()
    others = [submit(client, **body, seed=s, temperature=1.0) for s in range(3)]
    poisoned = client.post("/v1/generate", json={**body, "temperature": 1e-40}).json()
    assert poisoned["status"] == "succeeded"
    assert poisoned["result"]["text"] == greedy["result"]["text"]
    assert all(poll(client, j["id"])["status"] == "succeeded" for j in others)
