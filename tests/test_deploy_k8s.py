"""Static checks of the Kubernetes manifests: every variant rendered with `kubectl kustomize`,
every object validated against its schema, and the manifests cross-checked with the code."""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate  # type: ignore[import-untyped]
import orjson
import pytest
import yaml
from prometheus_client import REGISTRY

import gateway.metrics  # noqa: F401  (registers the gateway's metrics)
import worker.metrics  # noqa: F401  (registers the worker's metrics)
from common import keys
from common.catalog import parse_catalog
from common.settings import Settings
from tests.deploy_files import (
    HA_VARIANTS,
    K8S,
    ROOT,
    VARIANTS,
    Obj,
    config_file,
    container,
    container_port,
    crd_schema,
    drain_s,
    effective_env,
    gateway_paths,
    kubectl,
    named,
    of_kind,
    pod_spec,
    render,
    selects,
)
from worker.main import SHUTDOWN_MARGIN_S
from worker.probes import probe_app

# The oldest Kubernetes release the manifests are checked against (docs/deploy.md).
KUBERNETES_VERSION = "1.30"
# What a stopping process may take beyond its drain setting (the worker's hard deadline).
DRAIN_MARGIN_S = SHUTDOWN_MARGIN_S
SECRET_TEMPLATE = K8S / "secret.template.yaml"
DEFAULTS = Settings()

variants = pytest.mark.parametrize("variant", list(VARIANTS))
ha_variants = pytest.mark.parametrize("variant", HA_VARIANTS)
REDIS_HA = K8S / "components" / "redis-ha"
HA_SCRIPT = "/etc/redis/redis-ha.sh"


def workloads(objs: tuple[Obj, ...]) -> list[Obj]:
    return of_kind(objs, "Deployment") + of_kind(objs, "StatefulSet")


def genq_containers(objs: tuple[Obj, ...]) -> list[tuple[Obj, Obj]]:
    """(workload, container) for every gateway and worker container."""
    return [
        (w, c)
        for w in workloads(objs)
        for c in pod_spec(w)["containers"]
        if c["name"] in ("gateway", "worker")
    ]


def worker_pools(objs: tuple[Obj, ...]) -> dict[str, tuple[Obj, Obj]]:
    """pool -> (its worker Deployment, its ScaledObject)."""
    pools = {}
    for scaled in of_kind(objs, "ScaledObject"):
        deployment = named(objs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
        env = effective_env(objs, container(deployment, "worker"))
        pools[env.get("GENQ_POOL", DEFAULTS.pool)] = (deployment, scaled)
    return pools


def redis_ha_nodes(objs: tuple[Obj, ...]) -> tuple[list[str], list[str]]:
    """The Redis data nodes' and the sentinels' host:port, as the StatefulSet's pods are named in
    DNS through its headless Service."""
    redis = named(objs, "StatefulSet", "genq-redis")
    service = named(objs, "Service", redis["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    domain = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    hosts = [f"{redis['metadata']['name']}-{i}.{domain}" for i in range(redis["spec"]["replicas"])]
    return [f"{h}:{ports['redis']}" for h in hosts], [f"{h}:{ports['sentinel']}" for h in hosts]


def pull_policy(c: Obj) -> str:
    """The image pull policy Kubernetes applies: the container's own, else Always for an image
    tagged `latest` or not tagged, else IfNotPresent."""
    if "imagePullPolicy" in c:
        return str(c["imagePullPolicy"])
    name = c["image"].split("@")[0].rsplit("/", 1)[-1]
    tag = name.split(":", 1)[1] if ":" in name else "latest"
    return "Always" if tag == "latest" else "IfNotPresent"


def secret_template() -> Obj:
    template: Obj = yaml.safe_load(SECRET_TEMPLATE.read_text())
    return template


def metric_names() -> set[str]:
    return {family.name for family in REGISTRY.collect()}


def known_metric(name: str) -> bool:
    base = re.sub(r"_(total|bucket|sum|count)$", "", name)
    return name in metric_names() or base in metric_names()


@variants
def test_every_object_is_valid_kubernetes(variant: str) -> None:
    errors = []
    for obj in [*render(variant), secret_template()]:
        if obj["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
            continue  # custom resources: checked below
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {list(e.path)}: {e.message}")
    assert errors == []


@variants
def test_keda_objects_follow_the_keda_crds(variant: str) -> None:
    keda = [o for o in render(variant) if o["apiVersion"] == "keda.sh/v1alpha1"]
    assert {o["kind"] for o in keda} == {"ScaledObject", "TriggerAuthentication"}
    for obj in keda:
        errors = jsonschema.Draft7Validator(crd_schema(obj["kind"])).iter_errors(obj)
        assert [f"{list(e.path)}: {e.message}" for e in errors] == [], obj["metadata"]["name"]


def test_keda_schemas_refuse_a_misspelt_field() -> None:
    scaled = copy.deepcopy(of_kind(render("prod"), "ScaledObject")[0])
    scaled["spec"]["cooldownPeriods"] = 300
    assert not jsonschema.Draft7Validator(crd_schema("ScaledObject")).is_valid(scaled)


@variants
def test_each_scaledobject_reads_the_queue_key_of_its_workers_pool(variant: str) -> None:
    objs = render(variant)
    for pool, (deployment, scaled) in worker_pools(objs).items():
        env = effective_env(objs, container(deployment, "worker"))
        batch = int(env.get("GENQ_MAX_BATCH_SIZE", DEFAULTS.max_batch_size))
        for trigger in scaled["spec"]["triggers"]:
            meta = trigger["metadata"]
            if trigger["type"] in ("redis", "redis-sentinel"):
                assert meta["listName"] == keys.queue(pool)
                assert int(meta["listLength"]) == batch  # one worker's rows at once
                assert meta["activationListLength"] == "0"  # one queued job wakes the pool
            else:
                assert (
                    f'pool="{pool}"' in meta["query"]
                    or deployment["metadata"]["name"] in meta["query"]
                )
        formula = scaled["spec"].get("advanced", {}).get("scalingModifiers", {}).get("formula")
        if formula is not None:
            assert set(re.findall(r"\b\d+\b", formula)) <= {str(batch), "0"}, formula


@variants
def test_scaling_goes_to_zero_up_fast_down_slowly_and_waits_for_model_loads(variant: str) -> None:
    objs = render(variant)
    for deployment, scaled in worker_pools(objs).values():
        spec = scaled["spec"]
        assert spec["minReplicaCount"] == 0
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
        assert spec["fallback"]["replicas"] >= 1
        startup = container(deployment, "worker")["startupProbe"]
        slowest_load_s = startup["periodSeconds"] * startup["failureThreshold"]
        assert spec["cooldownPeriod"] >= slowest_load_s
        assert spec["initialCooldownPeriod"] >= slowest_load_s


@variants
def test_redis_trigger_authenticates_against_the_redis_the_workers_use(variant: str) -> None:
    objs = render(variant)
    url = urlsplit(secret_template()["stringData"]["redis-url"])
    service = named(objs, "Service", "genq-redis")
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "redis")
    address = f"genq-redis.{service['metadata']['namespace']}.svc.cluster.local:{port}"
    assert f"{url.hostname}:{url.port}" == address
    checked = 0
    for deployment, scaled in worker_pools(objs).values():
        env = effective_env(objs, container(deployment, "worker"))
        for trigger in scaled["spec"]["triggers"]:
            meta = trigger["metadata"]
            expected = {"password": "redis-password"}
            if trigger["type"] == "redis":
                assert "GENQ_REDIS_SENTINELS" not in env
                assert meta["address"] == address
            elif trigger["type"] == "redis-sentinel":
                # The sentinels genq's processes ask, for the primary they ask for.
                assert meta["addresses"] == env["GENQ_REDIS_SENTINELS"]
                assert meta["addresses"].split(",") == redis_ha_nodes(objs)[1]
                assert meta["sentinelMaster"] == env["GENQ_REDIS_SENTINEL_SERVICE"]
                expected["sentinelPassword"] = "redis-sentinel-password"
            else:
                continue
            assert meta["databaseIndex"] == url.path.strip("/")
            auth = named(objs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
            refs = {r["parameter"]: r["key"] for r in auth["spec"]["secretTargetRef"]}
            assert refs == expected
            checked += 1
    assert checked or variant.endswith("prometheus-scaling")


def test_prometheus_trigger_queries_only_metrics_that_exist() -> None:
    (scaled,) = of_kind(render("prod+prometheus-scaling"), "ScaledObject")
    triggers = {t["name"]: t["metadata"]["query"] for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"running", "waiting", "starting"}
    formula = scaled["spec"]["advanced"]["scalingModifiers"]["formula"]
    assert set(re.findall(r"[a-z]+", formula)) - {"max"} == set(triggers)
    for query in triggers.values():
        for name in re.findall(r"\bgenq_\w+", query):
            assert known_metric(name), name
    assert not known_metric("genq_no_such_metric")


@variants
def test_no_secret_is_rendered_and_every_secret_key_used_is_in_the_template(variant: str) -> None:
    objs = render(variant)
    assert of_kind(objs, "Secret") == []
    template = secret_template()
    name, provided = template["metadata"]["name"], set(template["stringData"])
    used = set()
    for w in workloads(objs):
        for c in pod_spec(w)["containers"]:
            for var in c.get("env", []):
                if "secretKeyRef" in var.get("valueFrom", {}):
                    used.add(
                        (
                            var["valueFrom"]["secretKeyRef"]["name"],
                            var["valueFrom"]["secretKeyRef"]["key"],
                        )
                    )
        for volume in pod_spec(w).get("volumes", []):
            if "secret" in volume:
                used |= {
                    (volume["secret"]["secretName"], i["key"]) for i in volume["secret"]["items"]
                }
    for auth in of_kind(objs, "TriggerAuthentication"):
        used |= {(r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert used
    assert used <= {(name, key) for key in provided}


@variants
def test_secret_and_registry_files_are_mounted_where_the_settings_point(variant: str) -> None:
    objs = render(variant)
    for w, c in genq_containers(objs):
        env = effective_env(objs, c)
        volumes = {v["name"]: v for v in pod_spec(w)["volumes"]}
        files: dict[str, str] = {}
        for mount in c["volumeMounts"]:
            volume = volumes[mount["name"]]
            if "secret" in volume:
                files |= {
                    f"{mount['mountPath']}/{i['path']}": i["key"] for i in volume["secret"]["items"]
                }
            if "configMap" in volume:
                data = named(objs, "ConfigMap", volume["configMap"]["name"])["data"]
                files |= {f"{mount['mountPath']}/{key}": key for key in data}
        needed = ["GENQ_REDIS_URL_FILE", "GENQ_WEBHOOK_SECRET_FILE", "GENQ_MODELS_FILE"]
        if variant in HA_VARIANTS:
            needed.append("GENQ_REDIS_SENTINEL_PASSWORD_FILE")
        for var in needed:
            assert env[var] in files, (w["metadata"]["name"], var)
        assert "GENQ_REDIS_URL" not in env


@variants
def test_gateway_listens_on_the_port_its_probes_and_service_use(variant: str) -> None:
    objs = render(variant)
    deployment = named(objs, "Deployment", "genq-gateway")
    c = container(deployment, "gateway")
    env = effective_env(objs, c)
    port = int(env.get("GENQ_PORT", DEFAULTS.port))
    assert env["GENQ_HOST"] == "0.0.0.0"
    for probe, path in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")]:
        get = c[probe]["httpGet"]
        assert get["path"] == path
        assert path in gateway_paths()
        assert container_port(c, get["port"]) == port
    service = named(objs, "Service", "genq-gateway")
    assert container_port(c, service["spec"]["ports"][0]["targetPort"]) == port


@variants
def test_worker_probes_use_the_worker_metrics_port(variant: str) -> None:
    objs = render(variant)
    for deployment, _ in worker_pools(objs).values():
        c = container(deployment, "worker")
        port = int(effective_env(objs, c)["GENQ_WORKER_METRICS_PORT"])
        assert port != 0
        paths = {
            "startupProbe": "/healthz",
            "livenessProbe": "/healthz",
            "readinessProbe": "/readyz",
        }
        for probe, path in paths.items():
            assert c[probe]["httpGet"]["path"] == path
            assert container_port(c, c[probe]["httpGet"]["port"]) == port


def test_the_worker_serves_the_paths_its_probes_use() -> None:
    """Each probe path of the worker's manifests is one of `worker.probes`' checks, not the
    metrics page that the same port serves for every other path."""
    app = probe_app(live=lambda: None, ready=lambda: "loading its models")
    paths = {
        c[probe]["httpGet"]["path"]
        for _, c in genq_containers(render("prod"))
        if c["name"] == "worker"
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
        if probe in c
    }
    assert paths == {"/healthz", "/readyz"}
    statuses: list[str] = []
    for path in sorted(paths):
        body = app({"PATH_INFO": path}, lambda status, _: statuses.append(status))
        assert orjson.loads(b"".join(body))["status"] in ("ok", "loading its models")
    assert statuses == ["200 OK", "503 Service Unavailable"]  # /healthz, /readyz


@variants
def test_termination_grace_covers_prestop_the_drain_and_a_margin(variant: str) -> None:
    objs = render(variant)
    checked = set()
    for w, c in genq_containers(objs):
        command = c["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        env = effective_env(objs, c)
        grace_s = pod_spec(w)["terminationGracePeriodSeconds"]
        needed = float(command[1]) + drain_s(c["name"], env) + DRAIN_MARGIN_S
        assert grace_s >= needed, w["metadata"]["name"]
        checked.add(c["name"])
    assert checked == {"gateway", "worker"}


@variants
def test_services_ingress_autoscalers_and_budgets_point_at_what_exists(variant: str) -> None:
    objs = render(variant)
    for service in of_kind(objs, "Service"):
        pods = [
            w
            for w in workloads(objs)
            if selects(
                {"matchLabels": service["spec"]["selector"]},
                w["spec"]["template"]["metadata"]["labels"],
            )
        ]
        assert pods, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            for w in pods:
                assert any(
                    p.get("name") == port["targetPort"]
                    for c in pod_spec(w)["containers"]
                    for p in c.get("ports", [])
                ), (service["metadata"]["name"], port)
    for ingress in of_kind(objs, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                service = named(objs, "Service", backend["name"])
                assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    for hpa in of_kind(objs, "HorizontalPodAutoscaler"):
        named(objs, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
    for pdb in of_kind(objs, "PodDisruptionBudget"):
        assert any(
            selects(pdb["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])
            for w in workloads(objs)
        )


@variants
def test_pods_run_as_non_root_read_only_without_capabilities(variant: str) -> None:
    for w in workloads(render(variant)):
        spec = pod_spec(w)
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in spec["containers"]:
            context = c["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert {"cpu", "memory"} <= set(c["resources"]["requests"])
            assert "memory" in c["resources"]["limits"]


@variants
def test_workers_get_a_memory_backed_dev_shm_and_a_gpu_in_prod(variant: str) -> None:
    objs = render(variant)
    for deployment, _ in worker_pools(objs).values():
        c = container(deployment, "worker")
        (shm,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        volume = next(v for v in pod_spec(deployment)["volumes"] if v["name"] == shm["name"])
        assert volume["emptyDir"]["medium"] == "Memory"
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        device = effective_env(objs, c)["GENQ_DEVICE"]
        assert (gpus, device) == ((1, "cuda") if variant.startswith("prod") else (None, "cpu"))


@variants
def test_redis_persists_its_append_only_file_within_its_memory_limit(variant: str) -> None:
    objs = render(variant)
    redis = named(objs, "StatefulSet", "genq-redis")
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    c = container(redis, "redis")
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]
    conf = config_file(objs, redis, "redis", "/etc/redis/redis.conf")
    assert re.search(r"^appendonly yes$", conf, re.M)
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.M)
    (maxmemory_mb,) = re.findall(r"^maxmemory (\d+)mb$", conf, re.M)
    limit = c["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    assert int(maxmemory_mb) < int(limit[:-2]) * 1024


@variants
def test_only_genq_pods_and_keda_reach_redis(variant: str) -> None:
    objs = render(variant)
    policy = named(objs, "NetworkPolicy", "genq-redis")
    redis = named(objs, "StatefulSet", "genq-redis")
    assert selects(policy["spec"]["podSelector"], redis["spec"]["template"]["metadata"]["labels"])
    (rule,) = policy["spec"]["ingress"]
    peers = [p for p in rule["from"] if "namespaceSelector" not in p]
    (keda,) = [p for p in rule["from"] if "namespaceSelector" in p]
    clients = of_kind(objs, "Deployment")
    if redis["spec"]["replicas"] > 1:
        clients.append(redis)  # replication, and the sentinels among themselves
    for w in clients:
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert any(selects(p["podSelector"], labels) for p in peers), w["metadata"]["name"]
    stranger = {"app.kubernetes.io/part-of": "genq", "app.kubernetes.io/component": "debug"}
    assert not any(selects(p["podSelector"], stranger) for p in peers)
    assert keda["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "keda"}
    served = [
        {"protocol": "TCP", "port": p["containerPort"]}
        for c in pod_spec(redis)["containers"]
        for p in c["ports"]
    ]
    assert sorted(rule["ports"], key=str) == sorted(served, key=str)


@variants
def test_every_pool_of_the_registry_has_workers_and_a_scaler(variant: str) -> None:
    objs = render(variant)
    (registry,) = [
        c for c in of_kind(objs, "ConfigMap") if c["metadata"]["name"].startswith("genq-models")
    ]
    path = K8S / "base" / "models.yaml"
    assert yaml.safe_load(registry["data"]["models.yaml"]) == yaml.safe_load(path.read_text())
    assert parse_catalog(path).pools() <= set(worker_pools(objs))


def test_registry_baked_into_the_worker_image_is_valid() -> None:
    catalog = parse_catalog(ROOT / "deploy" / "models.yaml")
    assert all(
        spec.source and spec.source.startswith("/models/") for spec in catalog.specs.values()
    )


def test_monitoring_scrapes_the_gateway_and_worker_services_with_their_pool() -> None:
    objs = render("prod")
    monitors = of_kind(objs, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {"genq-gateway", "genq-worker"}
    for monitor in monitors:
        services = [
            s
            for s in of_kind(objs, "Service")
            if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        assert services
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["path"] == "/metrics"
            for service in services:
                assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    # Worker series carry their own pool (tests/test_observability_stack.py): a target label of
    # that name would rename theirs.
    for monitor in monitors:
        for endpoint in monitor["spec"]["endpoints"]:
            targets = {r.get("targetLabel") for r in endpoint.get("relabelings", [])}
            assert "pool" not in targets


def test_deployment_alert_rules_are_complete() -> None:
    rule_sets = of_kind(render("prod"), "PrometheusRule")
    assert {r["metadata"]["name"] for r in rule_sets} == {"genq-deploy", "genq-serving"}
    rules = [r for s in rule_sets for group in s["spec"]["groups"] for r in group["rules"]]
    assert rules
    for rule in rules:
        assert rule["alert"].startswith("Genq")
        assert rule["expr"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
        for name in re.findall(r"\bgenq_\w+", rule["expr"]):
            assert known_metric(name), name


@variants
def test_every_object_lands_in_genq_s_namespace(variant: str) -> None:
    """Objects an overlay or a component adds get the namespace too (else `kubectl apply -k`
    puts them in the current one, where the workers would not find the models' volume claim)."""
    misplaced = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in render(variant)
        if o["kind"] != "Namespace" and o["metadata"].get("namespace") != "genq"
    ]
    assert misplaced == []


def test_dev_runs_the_images_kind_load_put_on_the_node() -> None:
    assert pull_policy({"image": "genq-gateway:latest"}) == "Always"  # what dev had before
    assert pull_policy({"image": "registry.example.com:5000/genq/worker"}) == "Always"
    objs = render("dev")
    containers = genq_containers(objs)
    assert {c["name"] for _, c in containers} == {"gateway", "worker"}
    for _, c in containers:
        assert c["imagePullPolicy"] == "IfNotPresent", c["name"]
    for w in workloads(objs):
        for c in pod_spec(w)["containers"]:
            assert pull_policy(c) != "Always", (w["metadata"]["name"], c["name"], c["image"])


@ha_variants
def test_redis_ha_runs_three_data_nodes_each_with_a_sentinel_on_its_own_node(variant: str) -> None:
    objs = render(variant)
    redis = named(objs, "StatefulSet", "genq-redis")
    spec, labels = pod_spec(redis), redis["spec"]["template"]["metadata"]["labels"]
    assert redis["spec"]["replicas"] == 3
    assert redis["spec"]["volumeClaimTemplates"]  # each node its own append-only file
    containers = {c["name"]: c for c in spec["containers"]}
    assert set(containers) == {"redis", "sentinel"}
    assert containers["redis"]["image"] == containers["sentinel"]["image"]
    assert containers["redis"]["command"] == ["sh", HA_SCRIPT, "redis"]
    assert containers["sentinel"]["command"] == ["sh", HA_SCRIPT, "sentinel"]
    assert containers["redis"]["readinessProbe"]["exec"]["command"] == ["sh", HA_SCRIPT, "ready"]
    required = spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(
        term["topologyKey"] == "kubernetes.io/hostname" and selects(term["labelSelector"], labels)
        for term in required
    )
    budget = named(objs, "PodDisruptionBudget", "genq-redis")
    assert selects(budget["spec"]["selector"], labels)
    assert budget["spec"]["maxUnavailable"] == 1
    assert named(objs, "Service", "genq-redis")["spec"]["publishNotReadyAddresses"] is True
    # The sentinels fail over on a majority's word, which one lost node leaves.
    sentinel_conf = config_file(objs, redis, "sentinel", "/etc/redis/sentinel.conf")
    ((service, quorum),) = re.findall(
        r"^sentinel monitor (\S+) @PRIMARY@ (\d+)$", sentinel_conf, re.M
    )
    assert int(quorum) == redis["spec"]["replicas"] // 2 + 1
    assert (
        service
        == re.findall(r"^SERVICE=(\S+)$", config_file(objs, redis, "redis", HA_SCRIPT), re.M)[0]
    )


@ha_variants
def test_redis_ha_nodes_sentinels_genq_and_keda_name_the_same_pods(variant: str) -> None:
    objs = render(variant)
    redis = named(objs, "StatefulSet", "genq-redis")
    nodes, sentinels = redis_ha_nodes(objs)
    pods = [f"{redis['metadata']['name']}-{i}" for i in range(redis["spec"]["replicas"])]
    for name, addresses in (("redis", nodes), ("sentinel", sentinels)):
        c = container(redis, name)
        env = effective_env(objs, c)
        assert env["POD_NAME"] == "<field metadata.name>"
        assert [env["ANNOUNCE"].replace("$(POD_NAME)", pod) for pod in pods] == addresses
        assert env["REDIS_NODES"].split() == nodes
        assert env["SENTINELS"].split() == sentinels
        for var in ("REDIS_CONF", "SENTINEL_CONF"):
            for path in env[var].split():
                config_file(objs, redis, name, path)
        mounted = {m["mountPath"] for m in c["volumeMounts"]}
        for var in ("REDIS_PASSWORD_FILE", "SENTINEL_PASSWORD_FILE"):
            assert env[var].rsplit("/", 1)[0] in mounted, var
    sentinel_conf = config_file(objs, redis, "sentinel", "/etc/redis/sentinel.conf")
    (service,) = re.findall(r"^sentinel monitor (\S+) ", sentinel_conf, re.M)
    for _, c in genq_containers(objs):
        env = effective_env(objs, c)
        assert env["GENQ_REDIS_SENTINELS"].split(",") == sentinels
        assert env["GENQ_REDIS_SENTINEL_SERVICE"] == service


@ha_variants
def test_redis_ha_acknowledges_what_a_replica_has_and_writes_with_a_node_down(variant: str) -> None:
    """A job is acknowledged once a replica has it (WAIT), and the primary refuses writes that
    no replica takes (min-replicas-to-write), yet one data node down leaves enough replicas for
    both."""
    objs = render(variant)
    redis = named(objs, "StatefulSet", "genq-redis")
    ha_conf = config_file(objs, redis, "redis", "/etc/redis/redis-ha.conf")
    (min_to_write,) = re.findall(r"^min-replicas-to-write (\d+)$", ha_conf, re.M)
    replicas_with_one_down = redis["spec"]["replicas"] - 1 - 1
    for _, c in genq_containers(objs):
        env = effective_env(objs, c)
        ack = int(env["GENQ_REDIS_MIN_REPLICAS_ACK"])
        assert 1 <= ack <= replicas_with_one_down
        assert 1 <= int(min_to_write) <= replicas_with_one_down
        # WAIT holds a gateway's connection that long: it must answer within a command's timeout.
        command_timeout_s = float(
            env.get("GENQ_REDIS_COMMAND_TIMEOUT_S", DEFAULTS.redis_command_timeout_s)
        )
        assert 0 < int(env["GENQ_REDIS_ACK_TIMEOUT_MS"]) < command_timeout_s * 1000


@ha_variants
def test_redis_ha_primary_hands_over_within_its_grace_period(variant: str) -> None:
    objs = render(variant)
    redis = named(objs, "StatefulSet", "genq-redis")
    c = container(redis, "redis")
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sh", HA_SCRIPT, "handover"]
    script = config_file(objs, redis, "redis", HA_SCRIPT)
    (wait_s,) = {int(s) for s in re.findall(r"\$\{HANDOVER_WAIT_S:-(\d+)\}", script)}
    (ask_s,) = {int(s) for s in re.findall(r"timeout (\d+) \\$", script, re.M)}
    asked = len(redis_ha_nodes(objs)[1]) - 1  # every sentinel but its own
    # Asking the sentinels, waiting for the promotion, then Redis's own shutdown (its AOF).
    needed = asked * ask_s + wait_s + 10
    assert pod_spec(redis)["terminationGracePeriodSeconds"] >= needed


def test_redis_ha_script_parses_and_compose_runs_the_same_files() -> None:
    configs = yaml.safe_load((ROOT / "compose" / "ha.yaml").read_text())["configs"]
    files = {(ROOT / "compose" / c["file"]).resolve() for c in configs.values()}
    assert files == {
        (REDIS_HA / name).resolve() for name in ("redis-ha.sh", "redis-ha.conf", "sentinel.conf")
    }
    out = subprocess.run(
        ["sh", "-n", str(REDIS_HA / "redis-ha.sh")], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr


def test_redis_ha_after_prometheus_scaling_stops_the_build(tmp_path: Path) -> None:
    """Listed after prometheus-scaling, redis-ha would find no `redis` trigger to turn into
    `redis-sentinel`: the build stops instead of leaving a trigger that reads a single Redis."""
    rel = Path(os.path.relpath(K8S, tmp_path))
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\n"
        "kind: Kustomization\n"
        f"resources: [{rel / 'overlays' / 'prod'}]\n"
        f"components: [{rel / 'components' / 'prometheus-scaling'}, "
        f"{rel / 'components' / 'redis-ha'}]\n"
    )
    out = subprocess.run(
        [kubectl(), "kustomize", str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert out.returncode != 0
    assert "/spec/triggers/0/type" in out.stderr
