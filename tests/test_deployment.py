"""What ships: docker-compose.yml, the Dockerfile, the Procfile, production settings and Celery's
wire format.

None of these tests touch the database; the compose checks read the file (interpolating its
variables as Compose does), start the compose file's Redis command on a private port when
`redis-server` is installed, and run `docker compose config` only where the compose plugin is.
"""

import os
import re
import secrets
import shutil
import socket
import string
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from kombu import Connection

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"

SERVICES = {"postgres", "redis", "migrate", "web", "worker", "control", "beat"}
APP_SERVICES = ["migrate", "web", "worker", "control", "beat"]
LONG_RUNNING_APP_SERVICES = ["web", "worker", "control", "beat"]

ALPHABET = string.ascii_letters + string.digits
# What an operator puts in .env: the compose file has no default for any of them.
COMPOSE_SECRETS = {
    "SECRET_KEY": "".join(secrets.choice(ALPHABET) for _ in range(60)),
    "POSTGRES_PASSWORD": secrets.token_hex(16),
    "REDIS_PASSWORD": secrets.token_hex(16),
}
# Compose's ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}.
VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


class MissingVariable(Exception):
    pass


def interpolate(value: str, variables: dict[str, str]) -> str:
    """`value` with its variables substituted as Compose does (enough for this file)."""

    def substitute(match: re.Match) -> str:
        name, operator, argument = match.groups()
        value = variables.get(name)
        unset = value is None or (value == "" and operator and operator.startswith(":"))
        if not unset:
            return value
        if operator and operator.endswith("?"):
            raise MissingVariable(f"{name}: {argument}")
        return argument if operator else ""

    return VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _depends_on(service: dict) -> dict[str, dict]:
    """depends_on in its long form, whichever form the file uses (a list or a mapping)."""
    depends_on = service.get("depends_on") or {}
    if isinstance(depends_on, list):
        return {name: {"condition": "service_started"} for name in depends_on}
    return depends_on


def _raw_environment(service: dict) -> dict[str, str]:
    """environment as a mapping, whichever form the file uses (KEY=VALUE list or a mapping)."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {key: str(value) for key, value in environment.items()}


def _environment(service: dict, variables: dict[str, str] = COMPOSE_SECRETS) -> dict[str, str]:
    """The service's environment as its container sees it, with `variables` set where Compose runs."""
    return {key: interpolate(value, variables) for key, value in _raw_environment(service).items()}


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

    def config(variables: dict[str, str]) -> subprocess.CompletedProcess:
        env = {key: value for key, value in os.environ.items() if key not in COMPOSE_SECRETS}
        return subprocess.run(
            [*command, "-f", str(COMPOSE_FILE), "config", "-q"],
            cwd=REPO_ROOT,
            env={**env, **variables},
            capture_output=True,
            text=True,
            timeout=60,
        )

    accepted = config(COMPOSE_SECRETS)
    without_secret_key = config({k: v for k, v in COMPOSE_SECRETS.items() if k != "SECRET_KEY"})

    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert without_secret_key.returncode != 0 and "SECRET_KEY" in without_secret_key.stderr


def test_image_runs_as_a_non_root_user():
    user_lines = [line.split()[1] for line in DOCKERFILE.read_text().splitlines() if line.strip().upper().startswith("USER ")]

    assert user_lines, "Dockerfile never switches away from root"
    user = user_lines[-1].split(":")[0]
    assert user not in {"root", "0"}


# Settings a test of production settings must not inherit from the shell or the test run.
PRODUCTION_KNOBS = {
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "REDIS_URL",
    "SECRET_KEY",
    "DEBUG",
    "ALLOWED_HOSTS",
    "ALLOW_EMBEDDED",
    "NUM_PROXIES",
    "TRUST_X_FORWARDED_PROTO",
    "SECURE_SSL_REDIRECT",
    "SECURE_HSTS_SECONDS",
    "CSRF_TRUSTED_ORIGINS",
    "CHAINSAGA_TEST_BACKEND",
}


def production_env(tmp_path, **variables: str) -> dict[str, str]:
    """The process environment for production settings: nothing inherited that could soften them,
    var/ in tmp_path, then `variables` (a value of None removes the variable)."""
    env = {key: value for key, value in os.environ.items() if key not in PRODUCTION_KNOBS}
    env.update(DJANGO_SETTINGS_MODULE="config.settings.production", CHAINSAGA_VAR_DIR=str(tmp_path))
    env.update({key: value for key, value in variables.items() if value is not None})
    return {key: value for key, value in env.items() if variables.get(key, "") is not None}


# Unreachable on purpose: none of these tests may open a connection.
A_PRODUCTION_SETUP = {
    "SECRET_KEY": COMPOSE_SECRETS["SECRET_KEY"],
    "DATABASE_URL": "postgres://chainsaga:pw@db.invalid:5432/chainsaga",
    "CELERY_BROKER_URL": "redis://:pw@broker.invalid:6379/0",
    "ALLOWED_HOSTS": "example.com",
}


def run_python(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)


def compose_app_env(compose, tmp_path) -> dict[str, str]:
    """The web service's environment as the container gets it; var/ in tmp_path, not /app/var."""
    web = _environment(compose["services"]["web"])
    return production_env(tmp_path, **{**web, "CHAINSAGA_VAR_DIR": str(tmp_path)})


def test_production_settings_pass_check_deploy_with_warnings_as_failures(tmp_path):
    result = run_python(production_env(tmp_path, **A_PRODUCTION_SETUP), "manage.py", "check", "--deploy", "--fail-level", "WARNING")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues (0 silenced)." in result.stdout


def test_check_deploy_on_the_compose_configuration_prints_no_warnings(compose, tmp_path):
    # The README shows this output. One check is silenced: compose serves plain HTTP on purpose
    # (SECURE_SSL_REDIRECT=false), and W008 says only that.
    result = run_python(compose_app_env(compose, tmp_path), "manage.py", "check", "--deploy")

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "System check identified no issues (1 silenced).", result.stdout + result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("missing", ["SECRET_KEY", "DATABASE_URL", "CELERY_BROKER_URL"])
@pytest.mark.parametrize("how", ["unset", "blank"])
def test_production_settings_refuse_to_start_without_a_secret_or_url_and_name_it(tmp_path, missing, how):
    env = production_env(tmp_path, **{**A_PRODUCTION_SETUP, missing: None if how == "unset" else "  "})

    result = run_python(env, "manage.py", "check")

    assert result.returncode != 0
    assert f"ImproperlyConfigured: environment variable {missing} is required" in result.stderr, result.stderr


@pytest.mark.parametrize(
    "variable, url, named",
    [
        ("DATABASE_URL", "sqlite:///{tmp}/chainsaga.sqlite3", "SQLite"),
        ("CELERY_BROKER_URL", "sqla-fast+sqlite:///{tmp}/broker.sqlite3", "SQLAlchemy"),
    ],
)
def test_production_settings_refuse_the_embedded_database_or_broker_unless_allowed(tmp_path, variable, url, named):
    setup = {**A_PRODUCTION_SETUP, variable: url.format(tmp=tmp_path)}

    refused = run_python(production_env(tmp_path, **setup), "manage.py", "check")
    allowed = run_python(production_env(tmp_path, **setup, ALLOW_EMBEDDED="true"), "manage.py", "check")

    assert refused.returncode != 0 and f"ImproperlyConfigured: {variable} " in refused.stderr and named in refused.stderr
    assert allowed.returncode == 0, allowed.stderr


def test_production_settings_run_embedded_only_when_explicitly_allowed(tmp_path):
    env = production_env(tmp_path, SECRET_KEY=COMPOSE_SECRETS["SECRET_KEY"], ALLOW_EMBEDDED="true")
    show = "import django; django.setup(); from django.conf import settings; print(settings.DATABASES['default']['ENGINE'], settings.CELERY_BROKER_URL.split(':')[0])"

    result = run_python(env, "-c", show)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["django.db.backends.sqlite3", "sqla-fast+sqlite"]


@pytest.mark.parametrize("trust, secure", [(None, "False"), ("false", "False"), ("true", "True")])
def test_production_believes_x_forwarded_proto_only_when_told_to(tmp_path, trust, secure):
    env = production_env(tmp_path, **A_PRODUCTION_SETUP, TRUST_X_FORWARDED_PROTO=trust)
    ask = (
        "import django; django.setup(); from django.test import RequestFactory; "
        "print(RequestFactory().get('/', HTTP_X_FORWARDED_PROTO='https').is_secure())"
    )

    result = run_python(env, "-c", ask)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == secure


def test_seed_demo_refuses_under_the_compose_configuration_before_touching_the_database(compose, tmp_path):
    # The compose database host does not resolve here: reaching for it would fail differently.
    result = run_python(compose_app_env(compose, tmp_path), "manage.py", "seed_demo")

    assert result.returncode != 0
    assert "refusing to create demo users" in result.stderr, result.stderr


# --- no default secrets ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(COMPOSE_SECRETS))
def test_compose_has_no_default_for_a_secret_and_refuses_to_start_without_it(compose, name):
    references = re.findall(r"\$\{" + name + r"\b([^}]*)\}", COMPOSE_FILE.read_text())
    without = {key: value for key, value in COMPOSE_SECRETS.items() if key != name}
    refused = []
    for service_name, service in compose["services"].items():
        try:
            _environment(service, without)
        except MissingVariable:
            refused.append(service_name)

    assert references, f"{name} is never used"
    assert all(reference.startswith(":?") for reference in references), references
    assert set(APP_SERVICES) <= set(refused)


def test_no_literal_secret_key_or_password_in_the_compose_environment(compose):
    for service_name, service in compose["services"].items():
        for key, value in _raw_environment(service).items():
            if any(word in key for word in ("SECRET", "PASSWORD", "AUTH")):
                assert re.fullmatch(r"\$\{\w+:\?[^}]*\}", value), (service_name, key, value)


def test_the_compose_app_urls_carry_the_database_and_redis_passwords(compose):
    for name in APP_SERVICES:
        environment = _environment(compose["services"][name])

        assert urlsplit(environment["DATABASE_URL"]).password == COMPOSE_SECRETS["POSTGRES_PASSWORD"]
        assert urlsplit(environment["CELERY_BROKER_URL"]).password == COMPOSE_SECRETS["REDIS_PASSWORD"]
        assert urlsplit(environment["REDIS_URL"]).password == COMPOSE_SECRETS["REDIS_PASSWORD"]


def test_compose_redis_requires_the_password(compose):
    command = [interpolate(str(arg), COMPOSE_SECRETS) for arg in compose["services"]["redis"]["command"]]

    assert command[command.index("--requirepass") + 1] == COMPOSE_SECRETS["REDIS_PASSWORD"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_compose_redis(service: dict, port: int, data_dir: Path) -> subprocess.Popen:
    """The compose file's Redis command on a private port, its data in `data_dir` (the volume)."""
    command = [interpolate(str(arg), COMPOSE_SECRETS) for arg in service["command"]]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir)],
        cwd=data_dir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, password=COMPOSE_SECRETS["REDIS_PASSWORD"], socket_timeout=0.5)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.poll() is None:
        try:
            client.ping()  # LOADING (the AOF being read back) is an error too
            break
        except redis.RedisError:
            time.sleep(0.05)
    return server


@pytest.fixture
def compose_redis(compose, tmp_path):
    """The compose file's Redis command, run here on a private port; yields (port, redis service)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    service = compose["services"]["redis"]
    port = _free_port()
    server = _start_compose_redis(service, port, tmp_path)
    try:
        yield port, service
    finally:
        server.terminate()
        server.wait(10)


def test_compose_redis_keeps_its_data_in_an_append_only_file_fsynced_every_second_on_a_volume(compose):
    redis_service = compose["services"]["redis"]
    command = [str(arg) for arg in redis_service["command"]]
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in redis_service.get("volumes", [])}

    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert "/data" in mounts, "the redis:7 image keeps its files in /data: without a volume a new container starts empty"
    assert mounts["/data"] in compose.get("volumes", {}), "a named volume declared in the file"


def test_the_compose_redis_keeps_a_stream_entry_when_killed_and_started_again(compose, tmp_path):
    # What the event streams rely on: an entry older than a second is on disk when Redis dies.
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    service, port = compose["services"]["redis"], _free_port()
    client = redis.Redis(port=port, password=COMPOSE_SECRETS["REDIS_PASSWORD"], socket_timeout=2)
    server = _start_compose_redis(service, port, tmp_path)
    try:
        entry_id = client.xadd("events.order", {"id": "e-1"})
        time.sleep(1.5)  # appendfsync everysec

        server.kill()  # kill -9: no shutdown, nothing written out
        server.wait(10)
        server = _start_compose_redis(service, port, tmp_path)

        assert client.xrange("events.order") == [(entry_id, {b"id": b"e-1"})]
    finally:
        server.terminate()
        server.wait(10)


def test_the_compose_redis_refuses_clients_without_the_password_and_serves_the_apps_urls(compose, compose_redis):
    port, redis_service = compose_redis
    app = _environment(compose["services"]["web"])
    here = lambda url: url.replace("@redis:6379", f"@127.0.0.1:{port}")  # noqa: E731
    healthcheck = [interpolate(str(arg), COMPOSE_SECRETS) for arg in redis_service["healthcheck"]["test"][1:]]

    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port, socket_timeout=2).ping()
    assert redis.Redis.from_url(here(app["REDIS_URL"]), socket_timeout=2).ping() is True
    with Connection(here(app["CELERY_BROKER_URL"]), connect_timeout=2) as broker:
        broker.ensure_connection(max_retries=1)
    probe = subprocess.run(
        [healthcheck[0], "-p", str(port), *healthcheck[1:]],
        env={**os.environ, **_environment(redis_service)},
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert probe.stdout.strip() == "PONG", probe.stdout + probe.stderr


# --- the development server ---------------------------------------------------------------------


def _procfile_web_arguments(**env: str) -> list[str]:
    """The Procfile's web command line as the shell expands it (printed, not run)."""
    web = next(line.split(":", 1)[1].strip() for line in (REPO_ROOT / "Procfile").read_text().splitlines() if line.startswith("web:"))
    clean = {key: value for key, value in os.environ.items() if key not in {"BIND_ADDRESS", "PORT"}}
    shown = subprocess.run(
        ["sh", "-c", web.replace("exec ", "printf '%s\\n' ", 1)], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return shown.stdout.split()


def test_the_make_run_dev_server_listens_on_loopback_unless_told_otherwise():
    default = _procfile_web_arguments()
    chosen = _procfile_web_arguments(BIND_ADDRESS="0.0.0.0", PORT="9000")

    assert default[default.index("runserver") + 1] == "127.0.0.1:8000"
    assert chosen[chosen.index("runserver") + 1] == "0.0.0.0:9000"


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


RABBITMQ_FILE = REPO_ROOT / "docker-compose.rabbitmq.yml"
RABBITMQ_SECRETS = {**COMPOSE_SECRETS, "RABBITMQ_PASSWORD": secrets.token_hex(16)}


def _merged_with_rabbitmq(compose: dict) -> dict:
    """docker-compose.yml with docker-compose.rabbitmq.yml laid over it as Compose merges them:
    mappings merged key by key, the override's scalars winning."""

    def merge(base, override):
        if isinstance(base, dict) and isinstance(override, dict):
            return {**base, **{key: merge(base.get(key), value) for key, value in override.items()}}
        return override

    return merge(compose, yaml.safe_load(RABBITMQ_FILE.read_text()))


def test_the_rabbitmq_override_points_every_app_service_at_a_non_guest_broker_on_its_own_vhost(compose):
    merged = _merged_with_rabbitmq(compose)
    rabbitmq = merged["services"]["rabbitmq"]
    server_env = _environment(rabbitmq, RABBITMQ_SECRETS)

    assert server_env["RABBITMQ_DEFAULT_USER"] not in ("", "guest")
    assert _has_healthcheck(rabbitmq)
    for name in APP_SERVICES:
        service = merged["services"][name]
        broker = urlsplit(_environment(service, RABBITMQ_SECRETS)["CELERY_BROKER_URL"])

        assert (broker.scheme, broker.hostname, broker.port) == ("amqp", "rabbitmq", 5672)
        assert broker.username == server_env["RABBITMQ_DEFAULT_USER"]
        assert broker.password == RABBITMQ_SECRETS["RABBITMQ_PASSWORD"]
        assert broker.path.lstrip("/") == server_env["RABBITMQ_DEFAULT_VHOST"]
        assert _depends_on(service)["rabbitmq"]["condition"] == "service_healthy"
        # What the override does not name stays as docker-compose.yml has it.
        assert _depends_on(service)["postgres"]["condition"] == "service_healthy"
        assert _environment(service, RABBITMQ_SECRETS)["SECRET_KEY"] == RABBITMQ_SECRETS["SECRET_KEY"]


def test_the_rabbitmq_override_has_no_default_password_and_refuses_to_start_without_it(compose):
    merged = _merged_with_rabbitmq(compose)
    references = re.findall(r"\$\{RABBITMQ_PASSWORD\b([^}]*)\}", RABBITMQ_FILE.read_text())
    refused = []
    for name, service in merged["services"].items():
        try:
            _environment(service, COMPOSE_SECRETS)
        except MissingVariable:
            refused.append(name)

    assert references and all(reference.startswith(":?") for reference in references), references
    assert set(APP_SERVICES) | {"rabbitmq"} <= set(refused)


def test_check_deploy_on_the_compose_configuration_with_rabbitmq_prints_no_warnings(compose, tmp_path):
    merged = _merged_with_rabbitmq(compose)
    web = _environment(merged["services"]["web"], RABBITMQ_SECRETS)
    result = run_python(production_env(tmp_path, **{**web, "CHAINSAGA_VAR_DIR": str(tmp_path)}), "manage.py", "check", "--deploy")

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "System check identified no issues (1 silenced).", result.stdout + result.stderr
