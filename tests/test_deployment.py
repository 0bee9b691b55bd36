"""What ships: docker-compose.yml, the Dockerfile, production settings and Celery's wire format.

None of these tests touch the database; the compose checks read the file, and `docker compose
config` runs only where the compose plugin is installed.
"""

import os
import secrets
import shutil
import string
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"

SERVICES = {"postgres", "redis", "migrate", "web", "worker", "control", "beat"}
APP_SERVICES = ["migrate", "web", "worker", "control", "beat"]
LONG_RUNNING_APP_SERVICES = ["web", "worker", "control", "beat"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _depends_on(service: dict) -> dict[str, dict]:
    """depends_on in its long form, whichever form the file uses (a list or a mapping)."""
    depends_on = service.get("depends_on") or {}
    if isinstance(depends_on, list):
        return {name: {"condition": "service_started"} for name in depends_on}
    return depends_on


def _environment(service: dict) -> dict[str, str]:
    """environment as a mapping, whichever form the file uses (KEY=VALUE list or a mapping)."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return environment


def _has_healthcheck(service: dict) -> bool:
    healthcheck = service.get("healthcheck") or {}
    test = healthcheck.get("test")
    return bool(test) and not healthcheck.get("disable", False) and test not in (["NONE"], "NONE")


def test_compose_file_has_exactly_the_seven_services(compose):
    assert set(compose["services"]) == SERVICES


@pytest.mark.parametrize("name", ["postgres", "redis", "web"])
def test_compose_service_has_a_healthcheck(compose, name):
    service = compose["services"][name]

    assert _has_healthcheck(service), f"{name} has no usable healthcheck: {service.get('healthcheck')!r}"


def test_migrate_runs_once_and_is_not_restarted(compose):
    migrate = compose["services"]["migrate"]

    # Must be the string "no": an unquoted `no` is YAML 1.1 false, which Compose rejects.
    assert migrate.get("restart") == "no"
    assert "migrate" in migrate["command"]


def test_migrate_waits_for_a_healthy_postgres(compose):
    depends_on = _depends_on(compose["services"]["migrate"])

    assert depends_on.get("postgres", {}).get("condition") == "service_healthy"


@pytest.mark.parametrize("name", LONG_RUNNING_APP_SERVICES)
def test_app_process_starts_only_after_migrate_completed_successfully(compose, name):
    depends_on = _depends_on(compose["services"][name])

    assert depends_on.get("migrate", {}).get("condition") == "service_completed_successfully"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_talks_to_the_compose_postgres_and_redis(compose, name):
    environment = _environment(compose["services"][name])

    database = urlsplit(environment.get("DATABASE_URL", ""))
    broker = urlsplit(environment.get("CELERY_BROKER_URL", ""))
    assert database.scheme in {"postgres", "postgresql"} and database.hostname == "postgres", environment
    assert broker.scheme == "redis" and broker.hostname == "redis", environment
    assert environment.get("DJANGO_SETTINGS_MODULE") == "config.settings.production"


def test_every_dependency_names_a_service_that_exists(compose):
    services = compose["services"]

    missing = {
        (name, dependency)
        for name, service in services.items()
        for dependency in _depends_on(service)
        if dependency not in services
    }

    assert not missing


def test_every_service_healthy_dependency_has_a_healthcheck_to_wait_for(compose):
    # `docker compose up` refuses service_healthy on a service without a healthcheck, and
    # `docker compose config` does not notice, so this is checked here.
    services = compose["services"]

    without_healthcheck = {
        (name, dependency)
        for name, service in services.items()
        for dependency, options in _depends_on(service).items()
        if options.get("condition") == "service_healthy" and not _has_healthcheck(services.get(dependency, {}))
    }

    assert not without_healthcheck


def test_docker_compose_accepts_the_file():
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        command = ["docker", "compose"] if probe.returncode == 0 else None
    else:
        command = None
    if command is None and shutil.which("docker-compose"):
        command = ["docker-compose"]
    if command is None:
        pytest.skip("neither the `docker compose` plugin nor `docker-compose` is installed; YAML checks above still ran")

    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_as_a_non_root_user():
    user_lines = [line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.strip().upper().startswith("USER ")]

    assert user_lines, "Dockerfile never switches away from root"
    user = user_lines[-1].split(":")[0]
    assert user not in {"root", "0"}


def test_production_settings_pass_check_deploy_with_warnings_as_failures(tmp_path):
    alphabet = string.ascii_letters + string.digits
    env = {
        key: value
        for key, value in os.environ.items()
        # Production defaults are under test, so no leftover override may soften them.
        if key not in {"DATABASE_URL", "DEBUG", "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "CSRF_TRUSTED_ORIGINS"}
    }
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings.production",
        SECRET_KEY="".join(secrets.choice(alphabet) for _ in range(60)),
        ALLOWED_HOSTS="example.com",
        CHAINSAGA_VAR_DIR=str(tmp_path),  # the embedded SQLite file lands here, not in var/
    )

    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_celery_speaks_json_only_and_acks_after_the_work_is_done():
    from config.celery import app

    conf = app.conf

    assert conf.task_serializer == "json"
    assert conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1


def _queues_of(command: list[str]) -> list[str]:
    return command[command.index("-Q") + 1].split(",") if "-Q" in command else []


def test_every_routed_task_has_a_compose_worker_for_its_queue_and_the_sweeper_its_own(compose):
    from django.conf import settings

    from config.env import control_routes

    default, control = "chainsaga", "chainsaga-control"  # what production settings derive with no env set
    routed = {route["queue"] for route in control_routes(control).values()}

    worker, sweeper = compose["services"]["worker"]["command"], compose["services"]["control"]["command"]

    assert _queues_of(worker) == [default]
    assert _queues_of(sweeper) == [control] and routed == {control}
    assert settings.CELERY_TASK_ROUTES["sagas.sweep"]["queue"] == settings.SAGAS_CONTROL_QUEUE


def test_the_procfile_runs_a_control_worker_beside_the_step_worker():
    procfile = dict(line.split(": ", 1) for line in (REPO_ROOT / "Procfile").read_text().splitlines() if line.strip())

    assert "-Q ${CELERY_TASK_DEFAULT_QUEUE:-chainsaga}-control" in procfile["control"]
    assert "-Q ${CELERY_TASK_DEFAULT_QUEUE:-chainsaga} " in procfile["worker"]
