"""Static checks of the Dockerfiles and the build context (no Docker engine needed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.settings import Settings
from tests.deploy_files import ROOT, dockerfile, env_instructions, final_stage

DOCKERFILES = [ROOT / "Dockerfile.gateway", ROOT / "Dockerfile.worker"]
HADOLINT = Path(sys.executable).parent / "hadolint"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint_without_a_warning(path: Path) -> None:
    # `-t style`: the lowest level fails too.
    out = subprocess.run(
        [str(HADOLINT), "--no-color", "-t", "style", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_hadolint_ignore_is_justified_by_a_comment_above_it(path: Path) -> None:
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[i - 1].strip()
            assert above.startswith("#"), f"line {i + 1} of {path}"
            assert "hadolint" not in above, f"line {i + 1} of {path}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_a_non_root_user_with_an_exec_form_command(path: Path) -> None:
    stage = final_stage(dockerfile(path))
    users = [args for op, args in stage if op == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    (cmd,) = [args for op, args in stage if op == "CMD"]
    assert json.loads(cmd)[0] == "genq"  # exec form: genq is PID 1 and gets SIGTERM


def _requirements(path: Path) -> list[str]:
    """The dependency list the Dockerfile's own command derives from pyproject.toml."""
    (script,) = re.findall(r'python -c "(.+?)" > requirements\.txt', path.read_text())
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_gateway_image_installs_the_gateway_extras_and_no_torch() -> None:
    names = {re.split(r"[<>=\[;]", r)[0] for r in _requirements(ROOT / "Dockerfile.gateway")}
    assert {"fastapi", "uvicorn", "redis", "arq"} <= names
    assert not names & {"torch", "transformers", "accelerate"}


def test_worker_image_installs_the_worker_extras() -> None:
    names = {re.split(r"[<>=\[;]", r)[0] for r in _requirements(ROOT / "Dockerfile.worker")}
    assert {"torch", "transformers", "redis", "arq"} <= names


def test_dependencies_are_installed_before_the_code_is_copied() -> None:
    for path in DOCKERFILES:
        instructions = dockerfile(path)
        steps = [f"{op} {args}" for op, args in instructions]
        install = next(i for i, s in enumerate(steps) if "-r requirements.txt" in s)
        first_code = next(i for i, s in enumerate(steps) if s.startswith("COPY common"))
        assert install < first_code, path.name


def test_gateway_healthcheck_and_exposed_port_are_the_gateway_port() -> None:
    stage = final_stage(dockerfile(ROOT / "Dockerfile.gateway"))
    env = env_instructions(stage)
    (exposed,) = [args for op, args in stage if op == "EXPOSE"]
    assert int(exposed) == int(env["GENQ_PORT"]) == Settings().port
    assert env["GENQ_HOST"] == "0.0.0.0"
    (check,) = [args for op, args in stage if op == "HEALTHCHECK"]
    assert "/healthz" in check
    assert "GENQ_PORT" in check


def test_worker_healthcheck_and_exposed_port_are_the_worker_metrics_port() -> None:
    stage = final_stage(dockerfile(ROOT / "Dockerfile.worker"))
    env = env_instructions(stage)
    (exposed,) = [args for op, args in stage if op == "EXPOSE"]
    assert int(exposed) == int(env["GENQ_WORKER_METRICS_PORT"])
    (check,) = [args for op, args in stage if op == "HEALTHCHECK"]
    assert "/healthz" in check
    assert "GENQ_WORKER_METRICS_PORT" in check


def test_worker_build_refuses_a_torch_build_of_another_cuda_release() -> None:
    """The guard of the cuda stage, run as the shell would run it."""
    text = (ROOT / "Dockerfile.worker").read_text()
    guard = re.search(r"RUN (release=.*?fi) \\", text, re.S)
    assert guard is not None
    script = guard.group(1).replace("\\\n", " ")
    for cuda, torch_cuda, ok in [
        ("12.8.1", "cu128", True),
        ("12.6.3", "cu126", True),
        ("12.8.1", "cu126", False),
        ("13.0.0", "cu128", False),
    ]:
        run = subprocess.run(
            ["sh", "-c", script],
            env={"CUDA_VERSION": cuda, "TORCH_CUDA": torch_cuda},
            capture_output=True,
            check=False,
        )
        assert (run.returncode == 0) is ok, (cuda, torch_cuda)


def test_build_context_holds_what_the_images_copy_and_nothing_else() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line for line in lines if line and not line.startswith("#")]
    assert patterns[0] == "*"  # everything out, then what is needed back in
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    for path in DOCKERFILES:
        instructions = dockerfile(path)
        args = dict(
            re.findall(r"(\w+)=(\S+)", " ".join(a for op, a in instructions if op == "ARG"))
        )
        for op, copy in instructions:
            if op != "COPY" or copy.startswith("--from"):
                continue
            for written in copy.split()[:-1]:
                # ${ARG} stands for the argument's default.
                source = re.sub(r"\$\{(\w+)\}", "{\\1}", written).format(**args)
                assert source.rstrip("/") in allowed, f"{path.name} copies {source}"
                assert (ROOT / source).exists(), source
