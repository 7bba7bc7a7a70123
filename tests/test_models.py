"""Model management through the public API: a registry with versions and aliases, a canary
split, a model whose checksum is wrong, loading on demand within a memory budget, and a reload
under a steady stream of requests (tiny models, real Redis, real gateway and worker)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from common.settings import Settings
from tests import keys
from tests.keys import bearer
from tests.procs import running_stack
from tests.tiny_model import build_tiny_model
from worker.loading import load_model

ADMIN = bearer(keys.OPERATOR)
PROMPT = "Once upon a time"


@dataclass(frozen=True)
class Versions:
    v1: Path
    v2: Path  # same shapes, other weights: its greedy text differs


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Versions:
    root = tmp_path_factory.mktemp("versions")
    return Versions(build_tiny_model(root / "v1"), build_tiny_model(root / "v2", seed=99))


def greedy_text(checkpoint: Path, max_new_tokens: int = 8) -> str:
    """What `model.generate` answers, in this process, for PROMPT."""
    lm = load_model(Settings(model=str(checkpoint), device="cpu"))
    ids = lm.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = lm.model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return str(lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


@contextmanager
def model_stack(
    root: Path, log_dir: Path, registry: str, *, serve: str | None, **settings: str
) -> Iterator[tuple[httpx.Client, Path]]:
    """Redis, a gateway and one worker sharing the registry file; yields a client of the
    gateway and the file's path."""
    registry_file = root / "models.yaml"
    registry_file.write_text(registry)
    with (
        running_stack(
            root / "redis",
            log_dir,
            serve=serve,
            GENQ_MODELS_FILE=str(registry_file),
            GENQ_API_KEYS=keys.keys_json(),
            GENQ_CACHE_ENABLED="false",
            **settings,
        ) as (_, base, _),
        httpx.Client(base_url=base, timeout=60, headers=ADMIN) as client,
    ):
        yield client, registry_file


def generate(client: httpx.Client, model: str | None, **fields: Any) -> dict[str, Any]:
    body = {"prompt": PROMPT, "max_new_tokens": 8, "temperature": 0, **fields}
    if model is not None:
        body["model"] = model
    resp = client.post("/v1/generate", json=body)
    assert resp.status_code == 200, resp.text
    job: dict[str, Any] = resp.json()
    return job


def version_state(client: httpx.Client, key: str) -> dict[str, Any]:
    name = key.split("@", 1)[0]
    (card,) = [c for c in client.get("/v1/models").json()["data"] if c["id"] == name]
    (version,) = [v for v in card["versions"] if v["id"] == key]
    return dict(version)


def wait_for(predicate: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


# --- Routing, limits, canary, aliases, a failed model: one stack ---------------------------


@pytest.fixture(scope="module")
def routed(
    tmp_path_factory: pytest.TempPathFactory, log_dir: Path, versions: Versions
) -> Iterator[httpx.Client]:
    registry = f"""
models:
  - {{name: tiny, version: "1", source: "{versions.v1}", preload: true}}
  - {{name: tiny, version: "2", source: "{versions.v2}", preload: true, max_new_tokens: 16}}
  - name: broken
    source: "{versions.v1}"
    sha256: {{model.safetensors: "{"0" * 64}"}}
  - {{name: large, source: "{versions.v1}", pool: big}}
aliases: {{default: tiny, stable: tiny@1}}
"""
    root = tmp_path_factory.mktemp("routed")
    with model_stack(root, log_dir, registry, serve="tiny") as (client, _):
        yield client


def test_requests_route_by_name_version_and_alias(routed: httpx.Client, versions: Versions) -> None:
    by_version = {key: generate(routed, key) for key in ("tiny@1", "tiny@2")}
    assert by_version["tiny@1"]["result"]["text"] == greedy_text(versions.v1)
    assert by_version["tiny@2"]["result"]["text"] == greedy_text(versions.v2)
    assert generate(routed, "tiny")["model"] == "tiny@2"  # the last listed version
    assert generate(routed, "stable")["model"] == "tiny@1"
    assert generate(routed, None)["model"] == "tiny@2"  # the `default` alias


def test_unknown_models_are_a_404_listing_the_served_ones(routed: httpx.Client) -> None:
    for name in ("gpt-17", "tiny@3"):
        resp = routed.post("/v1/jobs", json={"prompt": "x", "model": name})
        assert resp.status_code == 404
        message = resp.json()["error"]["message"]
        served = "tiny, broken, large, tiny@1, tiny@2, broken@1, large@1, default, stable"
        assert f"served models: {served}" in message


def test_jobs_queue_on_the_pool_that_serves_their_model(routed: httpx.Client) -> None:
    resp = routed.post("/v1/jobs", json={"prompt": "x", "model": "large"})
    assert resp.status_code == 202
    job = resp.json()
    assert (job["model"], job["position"]) == ("large@1", 0)
    pools = {p["pool"]: p for p in routed.get("/v1/queue").json()["pools"]}
    assert (pools["big"]["depth"], pools["big"]["workers_alive"]) == (1, 0)
    assert pools["default"]["workers_alive"] == 1
    routed.delete(f"/v1/jobs/{job['id']}")
    pools = {p["pool"]: p for p in routed.get("/v1/queue").json()["pools"]}
    assert pools["big"]["depth"] == 0


def test_per_model_limits_are_enforced_at_submit(routed: httpx.Client) -> None:
    resp = routed.post("/v1/jobs", json={"prompt": "x", "model": "tiny@2", "max_new_tokens": 17})
    assert resp.status_code == 422
    assert "tiny@2 allows at most 16 (max_new_tokens" in resp.json()["error"]["message"]
    assert generate(routed, "tiny@1", max_new_tokens=17)["status"] == "succeeded"


def test_a_checksum_mismatch_fails_its_jobs_while_other_models_serve(
    routed: httpx.Client,
) -> None:
    resp = routed.post("/v1/generate", json={"prompt": "x", "model": "broken"})
    job = resp.json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "model_unavailable"
    assert "checksum mismatch for model.safetensors" in job["error"]["message"]
    # The worker's heartbeat carries the model's state: it may land just after the job's end.
    wait_for(lambda: version_state(routed, "broken@1")["state"] == "failed", timeout_s=10)
    state = version_state(routed, "broken@1")
    assert "checksum mismatch" in state["reason"]
    # Failing fast: the second job does not try to load it again.
    again = routed.post("/v1/generate", json={"prompt": "x", "model": "broken"}).json()
    assert again["error"]["message"] == job["error"]["message"]
    assert generate(routed, "tiny")["status"] == "succeeded"


def test_a_canary_split_is_honoured_and_changed_at_run_time(routed: httpx.Client) -> None:
    split = {"weights": {"1": 80, "2": 20}}
    resp = routed.put("/v1/admin/models/tiny/traffic", json=split, headers=ADMIN)
    assert resp.status_code == 200, resp.text
    weights = {v["id"]: v["traffic_weight"] for v in resp.json()["versions"]}
    assert weights == {"tiny@1": 80, "tiny@2": 20}
    models: Counter[str] = Counter()
    for _ in range(3):
        items = [{"prompt": "x", "model": "tiny", "max_new_tokens": 1}] * 100
        batch = routed.post("/v1/jobs/batch", json={"requests": items}).json()
        models.update(item["job"]["model"] for item in batch["items"])
    # 300 draws at 20%: 60 expected, standard deviation 6.9.
    assert 35 <= models["tiny@2"] <= 85, models
    assert models["tiny@1"] + models["tiny@2"] == 300
    cleared = routed.delete("/v1/admin/models/tiny/traffic", headers=ADMIN).json()
    assert {v["traffic_weight"] for v in cleared["versions"]} == {None}
    assert generate(routed, "tiny")["model"] == "tiny@2"


def test_switching_an_alias_is_atomic_and_checked(routed: httpx.Client) -> None:
    resp = routed.put("/v1/admin/aliases/stable", json={"target": "tiny@2"}, headers=ADMIN)
    assert resp.status_code == 204
    assert generate(routed, "stable")["model"] == "tiny@2"
    card = next(c for c in routed.get("/v1/models").json()["data"] if c["id"] == "tiny")
    assert set(card["aliases"]) == {"default", "stable"}
    for alias, target, message in [
        ("stable", "tiny@9", "points to 'tiny@9', which is not a model"),
        ("tiny", "tiny@1", "would hide the model of that name"),
    ]:
        resp = routed.put(f"/v1/admin/aliases/{alias}", json={"target": target}, headers=ADMIN)
        assert resp.status_code == 422
        assert message in resp.json()["error"]["message"]
    routed.put("/v1/admin/aliases/stable", json={"target": "tiny@1"}, headers=ADMIN)
    assert generate(routed, "stable")["model"] == "tiny@1"


def test_admin_routes_need_the_admin_scope(routed: httpx.Client) -> None:
    for headers, status in [
        ({"Authorization": ""}, 401),
        (bearer("sk-not-a-key-of-this-gateway-000"), 401),
        (bearer(keys.ALICE), 403),
    ]:
        resp = routed.post("/v1/admin/models/tiny/reload", headers=headers)
        assert resp.status_code == status, resp.text
    assert "`admin` scope" in resp.json()["error"]["message"]
    resp = routed.post("/v1/admin/models/gpt-17/reload", headers=ADMIN)
    assert resp.status_code == 404


def test_model_sources_and_workers_are_shown_to_admins_only(routed: httpx.Client) -> None:
    for key, shown in [(keys.OPERATOR, True), (keys.ALICE, False)]:
        cards = routed.get("/v1/models", headers=bearer(key)).json()["data"]
        versions = [v for card in cards for v in card["versions"]]
        assert all((v["source"] is not None) is shown for v in versions), versions
        assert all((v["workers"] is not None) is shown for v in versions), versions
        assert any(card["workers"] > 0 for card in cards)  # the count stays for everyone


# --- Loading on demand within a memory budget ----------------------------------------------


def test_models_load_on_demand_and_the_least_recently_used_idle_one_is_evicted(
    tmp_path: Path, log_dir: Path, versions: Versions
) -> None:
    weights_mb = (versions.v1 / "model.safetensors").stat().st_size / 2**20
    registry = f"""
models:
  - {{name: a, source: "{versions.v1}"}}
  - {{name: b, source: "{versions.v2}"}}
"""
    # Room for one model, not two.
    budget = f"{weights_mb * 1.5:.4f}"
    with model_stack(
        tmp_path, log_dir, registry, serve=None, GENQ_MODEL_MEMORY_BUDGET_MB=budget
    ) as (client, _):
        assert version_state(client, "a@1")["state"] == "not_loaded"
        cold = generate(client, "a")
        assert cold["timings"]["model_load_s"] > 0
        assert version_state(client, "a@1")["state"] == "ready"
        assert generate(client, "a")["timings"]["model_load_s"] is None  # warm now
        assert generate(client, "b")["timings"]["model_load_s"] > 0
        wait_for(lambda: version_state(client, "b@1")["state"] == "ready")
        assert version_state(client, "a@1")["state"] == "not_loaded"  # evicted for b
        assert generate(client, "a")["timings"]["model_load_s"] > 0  # loaded again
        wait_for(lambda: version_state(client, "b@1")["state"] == "not_loaded")


# --- Reload without restart -----------------------------------------------------------------


def test_a_reload_under_steady_traffic_fails_nothing_and_serves_the_new_version(
    tmp_path: Path, log_dir: Path, versions: Versions
) -> None:
    registry = f'models: [{{name: tiny, version: "1", source: "{versions.v1}", preload: true}}]'
    with model_stack(tmp_path, log_dir, registry, serve="tiny") as (client, registry_file):
        before = generate(client, "tiny")
        assert before["result"]["text"] == greedy_text(versions.v1)
        jobs: list[dict[str, Any]] = []
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(base_url=client.base_url, timeout=60, headers=ADMIN) as own:
                while not stop.is_set():
                    jobs.append(generate(own, "tiny", max_new_tokens=24))

        streams = [threading.Thread(target=traffic) for _ in range(4)]
        for thread in streams:
            thread.start()
        wait_for(lambda: len(jobs) >= 8)
        # Version 2 replaces version 1 in the registry; nothing changes until the reload.
        new = registry.replace(str(versions.v1), str(versions.v2)).replace('"1"', '"2"')
        registry_file.write_text(new)
        assert generate(client, "tiny")["model"] == "tiny@1"
        accepted = client.post("/v1/admin/models/tiny/reload", headers=ADMIN)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json() == {
            "model": "tiny",
            "serves": "tiny@2",
            "versions": ["tiny@2"],
            "workers_notified": 1,
        }
        wait_for(lambda: version_state(client, "tiny@2")["state"] == "ready")
        seen = len(jobs)
        wait_for(lambda: len(jobs) >= seen + 8)
        stop.set()
        for thread in streams:
            thread.join()
        statuses = Counter(job["status"] for job in jobs)
        assert statuses == {"succeeded": len(jobs)}, [j.get("error") for j in jobs]
        assert jobs[-1]["model"] == "tiny@2"
        assert generate(client, "tiny")["result"]["text"] == greedy_text(versions.v2)
