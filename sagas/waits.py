"""Bounded waits in the database (DESIGN.md rule 15).

A step transaction on PostgreSQL runs with limits derived from the step's timeout:
  - `lock_timeout`: a step waiting for a row lock that a frozen or slow process holds gives up
    well before its soft time limit (which cannot interrupt a lock wait inside PostgreSQL) and
    is retried later, instead of being hard-killed at the time limit and losing a delivery;
  - `statement_timeout`: one statement cannot outlast the step;
  - `idle_in_transaction_session_timeout`: if the worker itself freezes (SIGSTOP, a debugger, a
    stuck call) inside the step's transaction, PostgreSQL ends its session after the step's
    timeout plus the hard-limit grace and the rows it locked are free again.
Every connection also has session-wide defaults (config.env.database: DB_LOCK_TIMEOUT,
DB_IDLE_IN_TRANSACTION_TIMEOUT).

`is_infrastructure_error` tells a database that is unreachable or a lock that was not granted in
time (the step did nothing wrong: retry without counting an attempt or a delivery) from a
failure of the step itself.
"""

from __future__ import annotations

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection

from sagas.definition import HARD_LIMIT_GRACE, Step

QUERY_CANCELED = "57014"  # statement_timeout: the step's own statement ran too long


def is_infrastructure_error(exc: BaseException) -> bool:
    """The database could not be reached or did not grant a lock in time: not the step's fault."""
    if not isinstance(exc, (OperationalError, InterfaceError)):
        return False
    return getattr(exc.__cause__, "sqlstate", None) != QUERY_CANCELED


# The three limits of a step transaction, as one SELECT list (sagas.sql prefixes the step's
# locking read with it, so a first delivery sets them without a round trip of its own).
SET_LIMITS = (
    "set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true), "
    "set_config('idle_in_transaction_session_timeout', %s, true)"
)


def step_limits(timeout: float) -> list[str]:
    """The values of SET_LIMITS for a step whose timeout is `timeout` seconds."""
    lock = min(timeout / 3, settings.SAGAS_STEP_LOCK_TIMEOUT_MAX)
    return [_ms(lock), _ms(timeout), _ms(timeout + HARD_LIMIT_GRACE)]


def limit_step_transaction(step: Step) -> None:
    """Bound the waits of the current transaction by the step's timeout (PostgreSQL; one round
    trip). Must run inside the step's transaction: the limits end with it."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {SET_LIMITS}", step_limits(step.timeout))


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"
