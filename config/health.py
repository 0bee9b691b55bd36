"""What /api/health/ knows: is each part answering, are the workers alive and taking work, and
what needs an operator. Every check runs in a thread of its own with a deadline, so a part that
hangs (a frozen Redis or PostgreSQL) is reported as a timeout instead of holding the answer.

Status: "down" when the database or the broker does not answer (nothing can be done); "degraded"
when orders can be taken but will not all go through (the cache is down, no worker is alive,
work waits while no worker has taken a task for WORKERS_STALLED_AFTER seconds, sagas in flight
have no definition in this deployment); "ok" otherwise. Errors name the part and the error type,
never a host, port or database name.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.utils import timezone

from config.db_deadline import bounded


@dataclass
class Outcome:
    """A check's answer: ok or not, and what it found."""

    ok: bool = False
    error: str = "timeout"
    facts: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "ok" if self.ok else self.error


def _in_thread(target) -> tuple[threading.Thread, Outcome]:
    outcome = Outcome()

    def run() -> None:
        try:
            outcome.facts = target()
            outcome.ok, outcome.error = True, ""
        except Exception as exc:  # noqa: BLE001 - the health check's boundary: reported, never raised
            outcome.error = f"error: {type(exc).__name__}"

    thread = threading.Thread(target=run, name="health-check", daemon=True)
    thread.start()
    return thread, outcome


def run_checks(*, timeout: float) -> dict[str, Outcome]:
    """Every check at once, each given until `timeout` seconds from now."""
    deadline = time.monotonic() + timeout
    started = {"database": _in_thread(lambda: _database_facts(timeout)), "broker": _in_thread(_broker_facts)}
    if settings.REDIS_URL:
        started["cache"] = _in_thread(_cache_facts)
    outcomes = {}
    for name, (thread, outcome) in started.items():
        thread.join(max(0.0, deadline - time.monotonic()))
        outcomes[name] = outcome if not thread.is_alive() else Outcome()
    return outcomes


def _database_facts(timeout: float) -> dict:
    """The database answers; and the facts kept there (database_facts)."""
    try:
        with bounded(timeout):
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            return database_facts(now=timezone.now())
    finally:
        connection.close()  # this thread's own connection


def database_facts(*, now) -> dict:
    """Workers, sagas, outbox, rejected messages and parked deliveries. Each is read through an
    index and reads only what is live (active or FAILED sagas, waiting events, the last minute
    or day), so a health check costs the same however long the history."""
    from sagas.heartbeat import workers_live
    from sagas.models import HousekeepingRun, ParkedDelivery, RejectedMessage, SagaInstance, SagaState
    from sagas.selectors import outbox_stats, sagas_stuck
    from sagas.versions import versions_in_use

    live = list(workers_live(now=now).values("hostname", "queues", "active", "accepted", "progress_at"))
    missing = {f"{v.name} v{v.version}": v.in_flight for v in versions_in_use() if v.definition is None and v.in_flight}
    return {
        "workers": live,
        "overdue_sagas": sagas_stuck(now=now).count(),
        "failed_sagas": SagaInstance.objects.filter(state=SagaState.FAILED).count(),
        "sagas_without_definition": missing,
        "outbox": outbox_stats(now=now),
        "rejected_messages_24h": RejectedMessage.objects.filter(received_at__gte=now - timedelta(hours=24)).count(),
        "parked_deliveries_24h": ParkedDelivery.objects.filter(parked_at__gte=now - timedelta(hours=24)).count(),
        "last_sweep": HousekeepingRun.objects.filter(task="sagas.sweep").values_list("ran_at", flat=True).first(),
    }


def _broker_facts() -> dict:
    """The broker answers; and how many messages wait in the step and control queues."""
    from celery import current_app

    with current_app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=settings.CELERY_BROKER_CONNECTION_TIMEOUT)
        waiting = {}
        for queue in (settings.CELERY_TASK_DEFAULT_QUEUE, settings.SAGAS_CONTROL_QUEUE):
            channel = conn.channel()
            try:
                waiting[queue] = channel.queue_declare(queue=queue, passive=True).message_count
            except conn.channel_errors:
                waiting[queue] = 0  # never declared: nothing waits in it
            finally:
                try:
                    channel.close()
                except conn.channel_errors + conn.connection_errors:
                    pass
        return {"waiting": waiting}


def _cache_facts() -> dict:
    from django.core.cache import cache

    cache.get("health-probe")
    return {}


def assess(outcomes: dict[str, Outcome], *, now=None) -> tuple[str, list[str]]:
    """("ok" | "degraded" | "down", the reasons)."""
    now = now or timezone.now()
    reasons = [f"{name} {outcome.status}" for name, outcome in outcomes.items() if name in ("database", "broker") and not outcome.ok]
    if reasons:
        return "down", reasons
    if "cache" in outcomes and not outcomes["cache"].ok:
        reasons.append(f"cache {outcomes['cache'].status}: throttles count per process")
    facts = outcomes["database"].facts
    workers = facts["workers"]
    waiting = sum(outcomes["broker"].facts["waiting"].values()) + facts["overdue_sagas"]
    if not workers:
        reasons.append("no celery worker alive")
    elif waiting:
        latest = max(w["progress_at"] for w in workers)
        idle = (now - latest).total_seconds()
        if idle > settings.WORKERS_STALLED_AFTER:
            reasons.append(f"work waits ({waiting}) but no worker took a task for {idle:.0f}s")
    sweep_late = _sweep_late(facts["last_sweep"], now=now)
    if sweep_late:
        reasons.append(sweep_late)
    for label, count in facts["sagas_without_definition"].items():
        reasons.append(f"{count} saga(s) in flight of {label}, which this deployment does not register")
    return ("degraded" if reasons else "ok"), reasons


def _sweep_late(last_sweep, *, now) -> str:
    """Why the sweeper looks stopped (celery beat, the control worker or its queue), or "". The
    sweeper re-drives lost messages and fires deadlines: without it nothing recovers."""
    allowed = 3 * settings.SAGAS_SWEEP_INTERVAL + settings.WORKERS_STALLED_AFTER
    if last_sweep is None:
        return "the sweeper never ran (is celery beat running, and a worker on the control queue?)"
    late = (now - last_sweep).total_seconds()
    if late > allowed:
        return f"the sweeper last ran {late:.0f}s ago (is celery beat running, and a worker on the control queue?)"
    return ""


def details(outcomes: dict[str, Outcome], reasons: list[str]) -> dict:
    """What staff (or the monitoring token) see besides the status."""
    facts = outcomes["database"].facts
    return {
        "reasons": reasons,
        "checks": {name: outcome.status for name, outcome in outcomes.items()},
        "workers": [
            {"hostname": w["hostname"], "queues": w["queues"], "active": w["active"], "accepted": w["accepted"],
             "last_progress": w["progress_at"]}
            for w in facts.get("workers", [])
        ],
        "queues_waiting": outcomes["broker"].facts.get("waiting"),
        "sagas": {key: facts[key] for key in ("overdue_sagas", "failed_sagas", "sagas_without_definition") if key in facts},
        "outbox": facts.get("outbox"),
        "rejected_messages_24h": facts.get("rejected_messages_24h"),
        "parked_deliveries_24h": facts.get("parked_deliveries_24h"),
        "last_sweep": facts.get("last_sweep"),
    }
