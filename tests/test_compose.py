"""docker-compose.yml has the services DESIGN.md names, wired in the right order, with no secret written in it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SERVICES = {"redis", "postgres", "migrate", "worker-gpu", "worker-train", "bot-discord", "bot-telegram"}
APP_SERVICES = SERVICES - {"redis", "postgres", "migrate"}
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|KEY", re.IGNORECASE)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return command.split() if isinstance(command, str) else command


def _queues(service: dict[str, Any]) -> set[str]:
    command = _command(service)
    return set(command[command.index("--queues") + 1].split(","))


def test_every_service_is_there(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= SERVICES


def test_migrate_is_one_shot_db_upgrade_after_postgres(compose: dict[str, Any]) -> None:
    migrate = compose["services"]["migrate"]
    assert _command(migrate)[-3:] == ["unichar", "db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", sorted(APP_SERVICES))
def test_app_services_wait_for_stores_and_migration(compose: dict[str, Any], name: str) -> None:
    depends = compose["services"][name]["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["migrate"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("name", ["redis", "postgres"])
def test_stores_have_health_checks(compose: dict[str, Any], name: str) -> None:
    assert compose["services"][name]["healthcheck"]["test"]


def test_gpu_worker_reserves_a_gpu_and_serves_chat_and_image(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker-gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert _queues(worker) == {"chat", "image"}
    assert compose["services"]["worker-gpu"]["build"]["target"] == "gpu"


def test_training_has_its_own_worker_and_queue(compose: dict[str, Any]) -> None:
    assert _queues(compose["services"]["worker-train"]) == {"train"}


@pytest.mark.parametrize(("name", "token"), [("bot-telegram", "TELEGRAM"), ("bot-discord", "DISCORD")])
def test_bots_get_their_token_from_the_environment(compose: dict[str, Any], name: str, token: str) -> None:
    environment = compose["services"][name]["environment"]
    assert f"UNICHAR_{token}_TOKEN" in environment
    assert environment[f"UNICHAR_{token}_TOKEN"] is None  # passed through, never written here


def test_no_secret_is_written_inline(compose: dict[str, Any]) -> None:
    """Every secret-looking variable is empty (passed through) or an interpolation of the environment."""
    for name, service in compose["services"].items():
        environment = service.get("environment", {})
        items = environment.items() if isinstance(environment, dict) else (e.partition("=")[::2] for e in environment)
        for key, value in items:
            if SECRET_NAME.search(key):
                assert value in (None, "") or re.fullmatch(r"\$\{\w+(:?[?-][^}]*)?\}", str(value)), (name, key)
            if "://" in str(value) and "@" in str(value):
                credentials = str(value).split("://", 1)[1].split("@", 1)[0]
                assert "${" in credentials, (name, key)


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_accepts_the_file() -> None:
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker client has no compose plugin")
    env = {**os.environ, "POSTGRES_PASSWORD": "compose-config-check"}
    result = subprocess.run(
        ["docker", "compose", "--profile", "telegram", "--profile", "discord", "config", "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_dockerfile_builds_cpu_by_default_and_gpu_on_request() -> None:
    """The last stage (docker build's default) is the CPU image; `--target gpu` adds the gpu extra; torch pinned."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, re.M)
    assert stages[-1] == "cpu" and "gpu" in stages
    gpu = text.split("AS gpu", 1)[1].split("AS cpu", 1)[0]
    assert "'.[gpu]'" in gpu
    assert re.findall(r"torch==[\d.]+", text) == ["torch==2.13.0", "torch==2.13.0"]
    assert "USER unichar" in text  # not root at run time
