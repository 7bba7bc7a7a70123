"""Static checks of compose/docker-compose.yml, against the Compose spec and the code."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from common.settings import Settings
from tests.deploy_files import ROOT, SCHEMAS, drain_s, gateway_paths
from worker.main import SHUTDOWN_MARGIN_S

COMPOSE = ROOT / "compose" / "docker-compose.yml"
DRAIN_MARGIN_S = SHUTDOWN_MARGIN_S


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # resolves `<<` merges
    return data


def service(name: str) -> dict[str, Any]:
    svc: dict[str, Any] = compose()["services"][name]
    return svc


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def healthcheck_url(name: str) -> tuple[int, str]:
    test = " ".join(service(name)["healthcheck"]["test"])
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/-]*)", test)
    assert match is not None, test
    return int(match.group(1)), match.group(2)


def test_compose_file_follows_the_compose_spec() -> None:
    schema = json.loads((SCHEMAS / "compose" / "compose-spec.json").read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(compose()))
    assert [f"{list(e.path)}: {e.message}" for e in errors] == []


def test_workers_come_in_a_gpu_and_a_cpu_profile() -> None:
    gpu, cpu = service("worker-gpu"), service("worker-cpu")
    assert gpu["profiles"] == ["gpu"]
    assert cpu["profiles"] == ["cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    assert "resources" not in cpu.get("deploy", {})
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    assert gpu["build"]["args"]["VARIANT"] == "cuda"


def test_every_long_running_service_has_a_health_check_and_a_restart_policy() -> None:
    for name, svc in compose()["services"].items():
        if name in ("model-fetch", "redis-restore"):  # one-shot jobs
            assert svc["restart"] == "no"
            continue
        assert "test" in svc["healthcheck"], name
        assert svc["restart"] == "unless-stopped", name


def test_services_wait_for_what_they_need() -> None:
    assert service("gateway")["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service("proxy")["depends_on"]["gateway"]["condition"] == "service_healthy"
    for worker in ("worker-cpu", "worker-gpu"):
        needs = service(worker)["depends_on"]
        assert needs["redis"]["condition"] == "service_healthy"
        assert needs["model-fetch"]["condition"] == "service_completed_successfully"


def test_redis_persists_to_a_volume_and_takes_its_password_from_a_secret() -> None:
    redis = service("redis")
    assert "redis-data:/data" in redis["volumes"]
    conf = (ROOT / "compose" / "redis.conf").read_text()
    assert re.search(r"^appendonly yes$", conf, re.M)
    assert "requirepass" not in conf  # the secret supplies it
    assert redis["secrets"] == ["redis_password"]
    assert "/run/secrets/redis_password" in " ".join(redis["command"])


def test_gateway_scales_behind_one_published_port() -> None:
    gateway, proxy = service("gateway"), service("proxy")
    assert "ports" not in gateway  # replicas would fight over a host port
    assert gateway["deploy"]["replicas"] == "${GATEWAY_REPLICAS:-2}"
    assert proxy["ports"] == ["${HTTP_PORT:-8000}:8000"]
    haproxy = (ROOT / "compose" / "haproxy.cfg").read_text()
    assert f"gateway:{Settings().port} check" in haproxy
    assert re.search(r"^\s*bind :8000$", haproxy, re.M)


def test_probes_and_scrapes_use_the_ports_and_paths_the_code_serves() -> None:
    routes = gateway_paths()
    port, path = healthcheck_url("gateway")
    assert "GENQ_PORT" not in service("gateway")["environment"]
    assert port == Settings().port
    assert path in routes
    haproxy = (ROOT / "compose" / "haproxy.cfg").read_text()
    (check,) = re.findall(r"option httpchk GET (\S+)", haproxy)
    assert check in routes
    scrape = yaml.safe_load((ROOT / "compose" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job["dns_sd_configs"][0] for job in scrape["scrape_configs"]}
    assert jobs["genq-gateway"]["port"] == Settings().port
    assert "/metrics" in routes
    for worker in ("worker-cpu", "worker-gpu"):
        metrics_port = int(service(worker)["environment"]["GENQ_WORKER_METRICS_PORT"])
        assert healthcheck_url(worker)[0] == metrics_port == jobs["genq-worker"]["port"]
        assert worker in jobs["genq-worker"]["names"]
        assert service(worker)["environment"]["GENQ_POOL"] == "default"


def test_stop_grace_periods_cover_the_drain() -> None:
    for name in ("worker-cpu", "worker-gpu", "gateway"):
        env = service(name)["environment"]
        grace_s = seconds(service(name)["stop_grace_period"])
        assert grace_s >= drain_s(name, env) + DRAIN_MARGIN_S, name


def test_genq_processes_read_their_secrets_from_files() -> None:
    for name in ("gateway", "worker-cpu", "worker-gpu"):
        env = service(name)["environment"]
        for var, secret in [
            ("GENQ_REDIS_URL_FILE", "redis_url"),
            ("GENQ_WEBHOOK_SECRET_FILE", "webhook_secret"),
        ]:
            assert env[var] == f"/run/secrets/{secret}"
            assert secret in service(name)["secrets"]
        assert "GENQ_REDIS_URL" not in env


def test_registry_volume_and_config_are_mounted_where_the_settings_point() -> None:
    for name in ("gateway", "worker-cpu", "worker-gpu"):
        svc = service(name)
        (config,) = svc["configs"]
        assert config["target"] == svc["environment"]["GENQ_MODELS_FILE"]
    for name in ("worker-cpu", "worker-gpu"):
        assert "models:/models:ro" in service(name)["volumes"]
    registry = compose()["configs"]["models_registry"]["file"]
    assert (COMPOSE.parent / registry).resolve() == ROOT / "deploy" / "models.yaml"


def test_make_secrets_creates_a_redis_url_that_carries_the_password(tmp_path: Path) -> None:
    script = tmp_path / "make-secrets.sh"
    shutil.copy(ROOT / "compose" / "make-secrets.sh", script)
    (tmp_path / "secrets").mkdir()
    subprocess.run(["sh", str(script)], check=True, capture_output=True)
    secrets = tmp_path / "secrets"
    password = (secrets / "redis_password").read_text().strip()
    assert len(password) == 48
    url_file = secrets / "redis_url"
    url = Settings(redis_url_file=url_file).redis_url.get_secret_value()
    assert url == f"redis://:{password}@redis:6379/0"
    before = {p.name: p.read_text() for p in secrets.iterdir()}
    subprocess.run(["sh", str(script)], check=True, capture_output=True)
    assert {p.name: p.read_text() for p in secrets.iterdir()} == before  # kept, not replaced
    assert set(before) == {
        s["file"].removeprefix("./secrets/") for s in compose()["secrets"].values()
    }
