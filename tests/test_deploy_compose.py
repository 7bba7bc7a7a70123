"""Static checks of compose/docker-compose.yml and compose/ha.yaml (the Sentinel setup used on top
of it), against the Compose spec and the code; Prometheus's and Alertmanager's configurations."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from common.settings import Settings
from genq.redis_server import free_port
from tests.deploy_files import ROOT, SCHEMAS, drain_s, gateway_paths
from worker.main import SHUTDOWN_MARGIN_S

COMPOSE = ROOT / "compose" / "docker-compose.yml"
HA = ROOT / "compose" / "ha.yaml"
PROMETHEUS = ROOT / "compose" / "prometheus" / "prometheus.yml"
ALERTMANAGER = ROOT / "compose" / "alertmanager" / "alertmanager.yml"
ALERT_SINK = ROOT / "compose" / "alertmanager" / "alert_sink.py"
DRAIN_MARGIN_S = SHUTDOWN_MARGIN_S
GENQ_SERVICES = ("gateway", "worker-cpu", "worker-gpu")
# Sequences that Compose merges across files instead of replacing (its merge rules).
_MERGED_SEQUENCES = {"secrets", "configs", "volumes", "ports", "expose", "tmpfs"}


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # resolves `<<` merges
    return data


def service(name: str) -> dict[str, Any]:
    svc: dict[str, Any] = compose()["services"][name]
    return svc


def merge(base: Any, override: Any, key: str = "") -> Any:
    """`docker compose -f base -f override`: mappings merge key by key; secrets, configs,
    volumes, ports, expose and tmpfs add up; anything else of the override replaces the base's."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = merge(base[k], v, k) if k in base else v
        return out
    if isinstance(base, list) and isinstance(override, list) and key in _MERGED_SEQUENCES:
        return base + [item for item in override if item not in base]
    return override


@cache
def ha_file() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(HA.read_text())
    return data


@cache
def compose_ha() -> dict[str, Any]:
    """The project as compose sees it with compose/ha.yaml on top."""
    merged: dict[str, Any] = merge(compose(), ha_file())
    return merged


def env_of(project: dict[str, Any], name: str) -> dict[str, str]:
    env: dict[str, str] = project["services"][name]["environment"]
    return env


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


@pytest.mark.parametrize("project", [compose, ha_file, compose_ha])
def test_compose_files_follow_the_compose_spec(project: Any) -> None:
    schema = json.loads((SCHEMAS / "compose" / "compose-spec.json").read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(project()))
    assert [f"{list(e.path)}: {e.message}" for e in errors] == []


def test_the_merge_rules_of_the_checks_are_compose_s() -> None:
    base = {"s": {"command": ["a"], "secrets": ["x"], "environment": {"A": "1"}}}
    over = {"s": {"command": ["b"], "secrets": ["x", "y"], "environment": {"B": "2"}}}
    assert merge(base, over) == {
        "s": {"command": ["b"], "secrets": ["x", "y"], "environment": {"A": "1", "B": "2"}}
    }


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
    for name, svc in compose_ha()["services"].items():
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
        s["file"].removeprefix("./secrets/") for s in compose_ha()["secrets"].values()
    }


def test_prometheus_sends_its_alerts_to_alertmanager_which_delivers_them_to_the_sink() -> None:
    prometheus = yaml.safe_load(PROMETHEUS.read_text())
    (manager,) = prometheus["alerting"]["alertmanagers"]
    (target,) = manager["static_configs"][0]["targets"]
    host, port = target.split(":")
    alertmanager = service(host)
    assert f"127.0.0.1:{port}:{port}" in alertmanager["ports"]
    mounts = dict(v.split(":")[:2] for v in alertmanager["volumes"])
    config = next(a for a in alertmanager["command"] if a.startswith("--config.file="))
    mounted = {target: source for source, target in mounts.items()}
    assert (COMPOSE.parent / mounted[config.split("=", 1)[1]]).resolve() == ALERTMANAGER
    routes = yaml.safe_load(ALERTMANAGER.read_text())
    receivers = {r["name"]: r for r in routes["receivers"]}
    used = [routes["route"]["receiver"], *(r["receiver"] for r in routes["route"]["routes"])]
    assert set(used) <= set(receivers)
    for name in used:
        (hook,) = receivers[name]["webhook_configs"]
        sink_host, sink_port = hook["url"].removeprefix("http://").rstrip("/").split(":")
        assert sink_port in service(sink_host)["expose"]
        assert healthcheck_url(sink_host)[0] == int(sink_port)
        assert hook["send_resolved"] is True
    # The rules Prometheus evaluates are the ones in the repository.
    (rules_glob,) = prometheus["rule_files"]
    volume = next(v for v in service("prometheus")["volumes"] if v.startswith("./"))
    source, target = volume.split(":")[:2]
    local = (COMPOSE.parent / source).resolve() / Path(rules_glob).relative_to(target)
    assert [p.name for p in local.parent.glob(local.name)] == ["genq.yml"]


def test_the_monitoring_files_name_only_files_that_exist() -> None:
    """Paths named in the comments of Prometheus's and Alertmanager's files exist (one named a
    generator that never was)."""
    for path in (PROMETHEUS, ALERTMANAGER, PROMETHEUS.parent / "rules" / "genq.yml"):
        comments = "\n".join(
            line for line in path.read_text().splitlines() if line.lstrip().startswith("#")
        )
        for name in re.findall(r"[\w.-]*/[\w./-]+\.(?:ya?ml|md|py|json)\b", comments):
            assert (ROOT / name).exists() or (path.parent / name).exists(), (path.name, name)


def test_the_alert_sink_prints_each_alert_it_receives() -> None:
    port = free_port()
    env = {**os.environ, "ALERT_SINK_HOST": "127.0.0.1", "ALERT_SINK_PORT": str(port)}
    sink = subprocess.Popen(
        [sys.executable, str(ALERT_SINK)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert sink.stdout is not None
        assert "listening" in sink.stdout.readline()
        notification = {
            "version": "4",
            "status": "firing",
            "alerts": [
                {
                    "status": "firing",
                    "labels": {"alertname": "GenqQueueGrowing", "severity": "warning", "pool": "a"},
                    "annotations": {"summary": "the queue of pool a grows"},
                },
                {"status": "resolved", "labels": {"alertname": "GenqNoLiveWorker"}},
            ],
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/",
            data=json.dumps(notification).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        assert sink.stdout.readline() == (
            "FIRING GenqQueueGrowing [warning] pool=a: the queue of pool a grows\n"
        )
        assert sink.stdout.readline() == "RESOLVED GenqNoLiveWorker [-]\n"
    finally:
        sink.terminate()
        sink.wait(timeout=5)


def test_ha_runs_a_primary_a_replica_and_three_sentinels_on_volumes_of_their_own() -> None:
    project = compose_ha()
    nodes = env_of(project, "redis")["REDIS_NODES"].split()
    sentinels = env_of(project, "redis")["SENTINELS"].split()
    assert nodes == ["redis:6379", "redis-replica:6379"]  # the first: the primary at first
    assert len(sentinels) == 3
    data_volumes = set()
    for name, svc in project["services"].items():
        env = svc.get("environment", {})
        if "ANNOUNCE" not in env:
            continue
        assert env["ANNOUNCE"].split(":")[0] == name
        assert env["ANNOUNCE"] in nodes + sentinels
        assert env["REDIS_NODES"].split() == nodes
        assert env["SENTINELS"].split() == sentinels
        assert svc["image"] == service("redis")["image"]
        role = "redis" if env["ANNOUNCE"] in nodes else "sentinel"
        assert svc["command"] == ["sh", "/usr/local/etc/redis/redis-ha.sh", role]
        files = {c["target"]: c["source"] for c in svc["configs"]}
        for var in ("REDIS_CONF", "SENTINEL_CONF"):
            for path in env[var].split():
                assert path in files, (name, path)
        for var in ("REDIS_PASSWORD_FILE", "SENTINEL_PASSWORD_FILE"):
            assert env[var].removeprefix("/run/secrets/") in svc["secrets"], (name, var)
        if role == "redis":
            (volume,) = [v for v in svc["volumes"] if v.endswith(":/data")]
            data_volumes.add(volume)
    assert len(data_volumes) == len(nodes)
    for source in ("redis_ha_conf", "redis_ha_sh", "sentinel_conf"):
        path = (COMPOSE.parent / project["configs"][source]["file"]).resolve()
        assert path == ROOT / "k8s" / "components" / "redis-ha" / path.name


def test_ha_points_every_genq_process_at_the_sentinels() -> None:
    project = compose_ha()
    sentinels = env_of(project, "redis")["SENTINELS"].split()
    (monitor,) = re.findall(
        r"^sentinel monitor (\S+) ",
        (ROOT / "k8s" / "components" / "redis-ha" / "sentinel.conf").read_text(),
        re.M,
    )
    for name in GENQ_SERVICES:
        env, svc = env_of(project, name), project["services"][name]
        assert env["GENQ_REDIS_SENTINELS"].split(",") == sentinels
        assert env["GENQ_REDIS_SENTINEL_SERVICE"] == monitor
        secret = env["GENQ_REDIS_SENTINEL_PASSWORD_FILE"].removeprefix("/run/secrets/")
        assert secret in svc["secrets"]
        assert env["GENQ_REDIS_URL_FILE"] == "/run/secrets/redis_url"  # its password
        assert int(env["GENQ_REDIS_MIN_REPLICAS_ACK"]) == 1  # one replica here
        for sentinel in sentinels:
            assert svc["depends_on"][sentinel.split(":")[0]]["condition"] == "service_healthy"
        assert svc.get("profiles") == service(name).get("profiles")  # still the same profiles
    # Without ha.yaml nothing asks for sentinels.
    for name in GENQ_SERVICES:
        assert "GENQ_REDIS_SENTINELS" not in service(name)["environment"]
