"""The deployment files (Dockerfiles, compose, Kubernetes manifests) read as data, for the static
checks of `tests/test_deploy_*.py`. Nothing here needs a Docker engine or a cluster."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.settings import Settings
from gateway.app import create_app

ROOT = Path(__file__).parent.parent
SCHEMAS = Path(__file__).parent / "schemas"
K8S = ROOT / "k8s"

Obj = dict[str, Any]

# What each rendered variant is built from: an overlay, plus optional components.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dev": ("dev", ()),
    "prod": ("prod", ()),
    "prod+prometheus-scaling": ("prod", ("prometheus-scaling",)),
    "prod-ha": ("prod-ha", ()),
    "prod-ha+prometheus-scaling": ("prod-ha", ("prometheus-scaling",)),
}
# The variants with Redis high availability (components/redis-ha).
HA_VARIANTS = [
    v for v in VARIANTS if VARIANTS[v][0].endswith("-ha") or "redis-ha" in VARIANTS[v][1]
]

# Files a user deploys from: every GENQ_* name in them must be a real setting.
DEPLOY_FILES = [
    ROOT / "Dockerfile.gateway",
    ROOT / "Dockerfile.worker",
    *sorted(p for d in ("compose", "k8s", "deploy") for p in (ROOT / d).rglob("*") if p.is_file()),
    ROOT / "docs" / "deploy.md",
    ROOT / "docs" / "operations.md",
]


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed here, so the Kubernetes manifests were not rendered")
    return found


@cache
def render(variant: str) -> tuple[Obj, ...]:
    """`kubectl kustomize` of one variant, as a tuple of objects."""
    overlay, components = VARIANTS[variant]
    with tempfile.TemporaryDirectory(prefix="genq-kustomize-") as tmp:
        # kustomize takes only relative paths to other kustomizations.
        rel = Path(os.path.relpath(K8S, tmp))
        lines = [
            "apiVersion: kustomize.config.k8s.io/v1beta1",
            "kind: Kustomization",
            "resources:",
            f"  - {rel / 'overlays' / overlay}",
            "components:" if components else "",
            *(f"  - {rel / 'components' / c}" for c in components),
        ]
        (Path(tmp) / "kustomization.yaml").write_text("\n".join(lines) + "\n")
        out = subprocess.run(
            [kubectl(), "kustomize", tmp], capture_output=True, text=True, check=False
        )
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize of {variant} failed:\n{out.stderr}")
    return tuple(o for o in yaml.safe_load_all(out.stdout) if o)


def of_kind(objs: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [o for o in objs if o["kind"] == kind]


def named(objs: tuple[Obj, ...], kind: str, name: str) -> Obj:
    found = [o for o in of_kind(objs, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Obj) -> Obj:
    spec: Obj = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Obj, name: str) -> Obj:
    found: list[Obj] = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{workload['metadata']['name']} has no container {name}"
    return found[0]


def effective_env(objs: tuple[Obj, ...], c: Obj) -> dict[str, str]:
    """The container's environment as the kubelet builds it: `envFrom` first, `env` over it.
    Values from Secrets are `<secret name/key>`, from the pod's fields `<field path>`; `$(VAR)`
    references stay as they are."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        data = named(objs, "ConfigMap", source["configMapRef"]["name"]).get("data", {})
        env.update(data)
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        elif "fieldRef" in var["valueFrom"]:
            env[var["name"]] = f"<field {var['valueFrom']['fieldRef']['fieldPath']}>"
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = f"<secret {ref['name']}/{ref['key']}>"
    return env


def config_file(objs: tuple[Obj, ...], workload: Obj, container_name: str, path: str) -> str:
    """The text of the file at `path` in a container, from the ConfigMap mounted above it."""
    c = container(workload, container_name)
    volumes = {v["name"]: v for v in pod_spec(workload)["volumes"]}
    for mount in c["volumeMounts"]:
        volume = volumes.get(mount["name"], {})  # not there: a volume claim's
        if "configMap" in volume and path.startswith(mount["mountPath"] + "/"):
            data: dict[str, str] = named(objs, "ConfigMap", volume["configMap"]["name"])["data"]
            return data[path.removeprefix(mount["mountPath"] + "/")]
    raise AssertionError(f"no ConfigMap holds {path} in {container_name}")


def container_port(c: Obj, port: int | str) -> int:
    """A probe's or Service's port (a name or a number) as the container's port number."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert numbers, f"container {c['name']} has no port named {port}"
    return int(numbers[0])


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Kubernetes label selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _strict(schema: Obj) -> Obj:
    """A CRD's schema that refuses unknown fields, as `kubectl apply --validate=strict` does
    (the API server would otherwise drop them without a word)."""
    out = {k: (_strict(v) if isinstance(v, dict) else v) for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    if "items" in out and isinstance(out["items"], dict):
        out["items"] = _strict(schema["items"])
    return out


@cache
def crd_schema(kind: str) -> Obj:
    """The strict schema of a KEDA object, from the CRDs copied into tests/schemas/keda."""
    for path in (SCHEMAS / "keda").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            (version,) = crd["spec"]["versions"]
            return _strict(version["schema"]["openAPIV3Schema"])
    raise KeyError(kind)


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            lines.append(pending.strip())
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def env_instructions(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in instructions:
        if op == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


@cache
def gateway_paths() -> frozenset[str]:
    """The paths the gateway serves, from its OpenAPI document."""
    return frozenset(create_app(Settings()).openapi()["paths"])


def drain_s(container: str, env: Mapping[str, str]) -> float:
    """How long a genq process takes to stop once signalled, by its settings: a gateway its
    shutdown grace, a worker the wait it gives running jobs."""
    defaults = Settings()
    if container.startswith("gateway"):
        return float(env.get("GENQ_SHUTDOWN_GRACE_S", defaults.shutdown_grace_s))
    return float(
        env.get("GENQ_WORKER_JOB_COMPLETION_WAIT_S", defaults.worker_job_completion_wait_s)
    )
