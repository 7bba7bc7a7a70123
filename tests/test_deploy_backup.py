"""Static checks of the backup and restore objects (k8s/components/redis-backup, compose's
redis-backup and redis-restore): they run redis-backup.sh, whose behaviour
tests/test_backup_restore.py checks, with the volumes, settings and image it needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.deploy_files import ROOT, Obj, container, named, of_kind, render, selects

SCRIPT = ROOT / "k8s" / "components" / "redis-backup" / "redis-backup.sh"
VARIANT = "prod"  # the overlay with the component


def job_pod(cronjob: Obj) -> Obj:
    spec: Obj = cronjob["spec"]["jobTemplate"]["spec"]["template"]
    return spec


def env(c: Obj) -> dict[str, Any]:
    return {v["name"]: v.get("value", v.get("valueFrom")) for v in c.get("env", [])}


def mounts(pod: Obj, c: Obj) -> dict[str, Obj]:
    """Mount path -> the volume mounted there."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}


def script_of(objs: tuple[Obj, ...], pod: Obj, c: Obj) -> str:
    """The script file the container's command runs, from the ConfigMap mounted there."""
    path = Path(c["command"][1])
    volume = mounts(pod, c)[str(path.parent)]
    data: str = named(objs, "ConfigMap", volume["configMap"]["name"])["data"][path.name]
    return data


def test_backup_and_restore_run_the_script_with_the_image_and_user_of_redis() -> None:
    objs = render(VARIANT)
    redis = named(objs, "StatefulSet", "genq-redis")
    redis_pod = redis["spec"]["template"]
    for name, mode in (("genq-redis-backup", "backup"), ("genq-redis-restore", "restore")):
        pod = job_pod(named(objs, "CronJob", name))
        (c,) = pod["spec"]["containers"]
        assert (c["command"][0], c["command"][2]) == ("sh", mode)
        assert script_of(objs, pod, c) == SCRIPT.read_text()
        # The restore's redis-server must write files that Redis's own reads.
        assert c["image"] == container(redis, "redis")["image"]
        assert pod["spec"]["securityContext"] == redis_pod["spec"]["securityContext"]


def test_the_restore_writes_on_the_volume_of_redis_pod_0_from_the_backups_volume() -> None:
    objs = render(VARIANT)
    redis = named(objs, "StatefulSet", "genq-redis")
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    data_path = next(
        m["mountPath"]
        for m in container(redis, "redis")["volumeMounts"]
        if m["name"] == claim["metadata"]["name"]
    )
    backup_pod = job_pod(named(objs, "CronJob", "genq-redis-backup"))
    restore_pod = job_pod(named(objs, "CronJob", "genq-redis-restore"))
    (backup,), (restore,) = backup_pod["spec"]["containers"], restore_pod["spec"]["containers"]
    written = mounts(backup_pod, backup)[env(backup)["BACKUP_DIR"]]
    read = mounts(restore_pod, restore)[env(restore)["BACKUP_DIR"]]
    assert written["persistentVolumeClaim"] == read["persistentVolumeClaim"]
    named(objs, "PersistentVolumeClaim", read["persistentVolumeClaim"]["claimName"])
    target = mounts(restore_pod, restore)[env(restore)["DATA_DIR"]]
    assert target["persistentVolumeClaim"]["claimName"] == (
        f"{claim['metadata']['name']}-{redis['metadata']['name']}-0"
    )
    assert env(restore)["DATA_DIR"] == data_path
    # The snapshot's name comes from a ConfigMap the operator creates, or is the newest.
    assert env(restore)["RESTORE_SNAPSHOT"]["configMapKeyRef"]["optional"] is True


def test_the_backup_reaches_redis_with_the_password_redis_uses() -> None:
    objs = render(VARIANT)
    pod = job_pod(named(objs, "CronJob", "genq-redis-backup"))
    (c,) = pod["spec"]["containers"]
    service = named(objs, "Service", env(c)["REDIS_HOST"])
    redis = named(objs, "StatefulSet", "genq-redis")
    assert selects(
        {"matchLabels": service["spec"]["selector"]},
        redis["spec"]["template"]["metadata"]["labels"],
    )
    (rule,) = named(objs, "NetworkPolicy", "genq-redis")["spec"]["ingress"]
    assert any(selects(p["podSelector"], pod["metadata"]["labels"]) for p in rule["from"])
    password = Path(env(c)["REDIS_PASSWORD_FILE"])
    secret = mounts(pod, c)[str(password.parent)]["secret"]
    redis_secret = next(v for v in redis["spec"]["template"]["spec"]["volumes"] if "secret" in v)
    assert secret == redis_secret["secret"]
    assert password.name in {i["path"] for i in secret["items"]}


def test_backups_never_overlap_and_the_restore_runs_only_when_asked_and_once() -> None:
    objs = render(VARIANT)
    backup, restore = (
        named(objs, "CronJob", n) for n in ("genq-redis-backup", "genq-redis-restore")
    )
    assert backup["spec"]["concurrencyPolicy"] == "Forbid"
    assert "suspend" not in backup["spec"]
    assert restore["spec"]["suspend"] is True
    assert restore["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0
    assert [c["metadata"]["name"] for c in of_kind(objs, "CronJob")] == [
        "genq-redis-backup",
        "genq-redis-restore",
    ]


def test_compose_backs_up_and_restores_with_the_same_script_image_and_volumes() -> None:
    compose = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    redis, backup, restore = (services[n] for n in ("redis", "redis-backup", "redis-restore"))
    for svc in (backup, restore):
        (config,) = svc["configs"]
        assert svc["entrypoint"] == ["sh", config["target"]]
        assert (ROOT / "compose" / compose["configs"][config["source"]]["file"]).resolve() == SCRIPT
        assert (svc["image"], svc["user"]) == (redis["image"], redis["user"])
    assert backup["environment"]["REDIS_HOST"] == "redis"
    assert backup["environment"]["REDIS_PASSWORD_FILE"] == "/run/secrets/redis_password"
    assert backup["secrets"] == redis["secrets"]
    assert backup["command"][0] == "every"
    assert f"redis-backups:{backup['environment']['BACKUP_DIR']}" in backup["volumes"]
    assert f"redis-backups:{restore['environment']['BACKUP_DIR']}:ro" in restore["volumes"]
    assert f"redis-data:{restore['environment']['DATA_DIR']}" in restore["volumes"]
    assert "redis-data:/data" in redis["volumes"]
    assert restore["profiles"] == ["restore"]  # never started by `up`
