"""Reading settings from the environment, with the embedded defaults in one place."""

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("CHAINSAGA_VAR_DIR", BASE_DIR / "var"))

SQLITE_OPTIONS = {
    # WAL lets the web process read while a worker writes; IMMEDIATE takes the write lock at
    # BEGIN so two writers queue on the busy timeout instead of deadlocking on lock upgrade.
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    "transaction_mode": "IMMEDIATE",
    "timeout": 30,
}


def env_str(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None:
        raise ImproperlyConfigured(f"environment variable {name} is required")
    return value


def env_required(name: str, purpose: str) -> str:
    """The variable's value; ImproperlyConfigured naming it and saying what it is for when unset or blank."""
    value = os.environ.get(name, "").strip()
    if not value:
        raise ImproperlyConfigured(f"environment variable {name} is required: {purpose}")
    return value


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"environment variable {name}={value!r} is not a boolean")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"environment variable {name}={value!r} is not an integer") from None


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise ImproperlyConfigured(f"environment variable {name}={value!r} is not a number") from None


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def database(url: str | None, *, sqlite_file: Path) -> dict:
    """A Django DATABASES entry from a URL, or the embedded SQLite file when url is empty."""
    url = (url or "").strip()
    if not url:
        url = f"sqlite:///{sqlite_file}"
    config = dj_database_url.parse(url, conn_max_age=0 if url.startswith("sqlite") else 60)
    if config["ENGINE"] == "django.db.backends.sqlite3":
        config["OPTIONS"] = dict(SQLITE_OPTIONS)
    elif config["ENGINE"] == "django.db.backends.postgresql":
        config["OPTIONS"] = {**postgres_options(), **config.get("OPTIONS", {})}
    return config


def postgres_options() -> dict:
    """Every wait bounded (DESIGN.md rule 15): connecting, a dead peer (TCP keepalives), a lock
    held too long, and a client that froze inside a transaction holding locks. Step
    transactions tighten these per step (sagas.waits)."""
    lock_ms = env_int("DB_LOCK_TIMEOUT_MS", 5000)
    idle_ms = env_int("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS", 60000)
    return {
        # Server-side binding: parameters travel apart from the statement, and psycopg prepares a
        # statement once it has run it a few times (the engine's hot path runs the same few). Off
        # behind PgBouncer in transaction mode (before 1.21), which cannot keep prepared statements.
        "server_side_binding": env_bool("DB_SERVER_SIDE_BINDING", False),
        "connect_timeout": env_int("DB_CONNECT_TIMEOUT", 3),  # libpq's minimum is 2
        "keepalives": 1,
        "keepalives_idle": 10,
        "keepalives_interval": 5,
        "keepalives_count": 3,
        "options": f"-c lock_timeout={lock_ms} -c idle_in_transaction_session_timeout={idle_ms}",
    }


def broker_url(url: str | None, *, sqlite_file: Path) -> str:
    """The Celery broker URL, or Celery's SQLAlchemy transport on a SQLite file when empty."""
    return (url or "").strip() or f"sqla-fast+sqlite:///{sqlite_file}"  # config.broker


def control_routes(queue: str) -> dict:
    """Celery task routes sending the housekeeping tasks (the engine's and the apps' retention) to the control queue."""
    housekeeping = (
        "sagas.sweep", "sagas.consumers_redeliver", "sagas.outbox_cleanup", "sagas.prune_sagas", "sagas.prune_inbox",
        "orders.prune_idempotency_records", "inventory.prune_reservations",
    )
    return {name: {"queue": queue} for name in housekeeping}


def is_sqlalchemy_broker(url: str) -> bool:
    return url.startswith(("sqla+", "sqlalchemy+", "sqla-fast+"))


def broker_transport_options(url: str, *, visibility_timeout: int) -> dict:
    # The SQLAlchemy transport has no visibility timeout: a message taken by a worker that dies is
    # recovered by the saga sweeper. The stock one passes its options to create_engine; the
    # embedded one (config.broker) also reads how long a consumer with nothing to do waits
    # before it looks again.
    if url.startswith("sqla-fast+"):
        return {"polling_interval": env_float("BROKER_POLLING_INTERVAL", 0.1)}
    if is_sqlalchemy_broker(url):
        return {}
    options = {"visibility_timeout": visibility_timeout}
    if url.startswith(("redis", "rediss")):
        # kombu applies these to synchronous commands (a publish), not to the worker's BRPOP.
        options.update(socket_timeout=env_float("BROKER_SOCKET_TIMEOUT", 1.5), socket_connect_timeout=env_float("BROKER_CONNECT_TIMEOUT", 1.5))
    return options


def refuse_embedded(*, database_config: dict, broker: str) -> None:
    """ImproperlyConfigured when the database is SQLite or the broker is the SQLAlchemy transport:
    fine on a laptop, not where several hosts or much load share them."""
    if database_config["ENGINE"] == "django.db.backends.sqlite3":
        raise ImproperlyConfigured("DATABASE_URL points at SQLite; use PostgreSQL, or set ALLOW_EMBEDDED=true to run on SQLite anyway")
    if is_sqlalchemy_broker(broker):
        raise ImproperlyConfigured(
            "CELERY_BROKER_URL is the SQLAlchemy transport; use Redis or RabbitMQ, or set ALLOW_EMBEDDED=true to run on it anyway"
        )
