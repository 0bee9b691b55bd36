"""Prometheus metrics of the engine (prometheus-client in multiprocess mode).

Every process that records (gunicorn workers, Celery pool children, beat) writes its counters and
histograms to files in PROMETHEUS_MULTIPROC_DIR (config.settings sets it before anything imports
prometheus_client); the /metrics view adds them up. Files are named by host and pid, so
containers that share the folder do not overwrite each other's. The saga and outbox gauges are
not kept in processes: they are read from the database when /metrics is scraped, through the
same index-backed reads as /api/health/ (sagas.versions, sagas.selectors).

What is counted where:
  - sagas started / finished (by name, version, outcome): when the transaction that started or
    finished the saga commits (sagas.services);
  - step and compensation deliveries (duration histogram by saga, step, direction, outcome),
    retries, compensation failures: by the Metrics interceptor around each delivery (sagas.runner);
  - deliveries that found an earlier delivery unfinished (a worker lost, a hard time limit);
  - outbox events published and their commit -> publish latency (sagas.relay);
  - consumer failures and give-ups (sagas.consumers).
"""

from __future__ import annotations

import hmac
import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.db import DatabaseError, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess, values
from prometheus_client.core import GaugeMetricFamily

from sagas.interceptors import Interceptor

if TYPE_CHECKING:
    from sagas.runner import Delivery, StepResult

_HOST = socket.gethostname()
# A multiprocess value's file is named by this identifier: host and pid, not the pid alone.
values.ValueClass = values.MultiProcessValue(process_identifier=lambda: f"{_HOST}_{os.getpid()}")

NAMESPACE = "chainsaga"
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
PUBLISH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)

SAGAS_STARTED = Counter("sagas_started", "Sagas started", ["saga", "version"], namespace=NAMESPACE)
SAGAS_FINISHED = Counter(
    "sagas_finished", "Sagas that reached a terminal state (a FAILED saga retried and finished again counts again)",
    ["saga", "version", "outcome"], namespace=NAMESPACE,
)
STEP_DURATION = Histogram(
    "step_duration_seconds", "One delivery of a step or compensation, from arrival to the end of its transaction",
    ["saga", "step", "direction", "outcome"], namespace=NAMESPACE, buckets=STEP_BUCKETS,
)
STEP_RETRIES = Counter("step_retries", "Step deliveries that failed transiently and were retried", ["saga", "step", "direction"], namespace=NAMESPACE)
LOST_DELIVERIES = Counter(
    "step_lost_deliveries", "Deliveries that found an earlier delivery of the step unfinished (worker lost, hard time limit)",
    ["saga", "step", "direction"], namespace=NAMESPACE,
)
COMPENSATION_FAILURES = Counter(
    "compensation_failures", "Compensations that failed for good (the saga is FAILED and needs attention)", ["saga", "step"], namespace=NAMESPACE,
)
OUTBOX_PUBLISHED = Counter("outbox_published", "Outbox events published by the relay", ["aggregate_type"], namespace=NAMESPACE)
OUTBOX_PUBLISH_LATENCY = Histogram(
    "outbox_publish_latency_seconds", "From an outbox event's commit to its publication", namespace=NAMESPACE, buckets=PUBLISH_BUCKETS,
)
CONSUMER_FAILURES = Counter("consumer_failures", "Event deliveries whose handler raised", ["consumer"], namespace=NAMESPACE)
CONSUMER_GIVE_UPS = Counter("consumer_give_ups", "Events a consumer gave up on (parked for an operator)", ["consumer"], namespace=NAMESPACE)


def enabled() -> bool:
    return settings.SAGAS_METRICS


def after_commit(record: Callable[[], Any]) -> None:
    """Record once the current transaction commits (at once outside one)."""
    if enabled():
        transaction.on_commit(record)


def saga_started(name: str, version: int) -> None:
    after_commit(lambda: SAGAS_STARTED.labels(name, str(version)).inc())


def saga_finished(name: str, version: int, outcome: str) -> None:
    after_commit(lambda: SAGAS_FINISHED.labels(name, str(version), outcome).inc())


def lost_delivery(saga: str, step: str, direction: str) -> None:
    if enabled():
        LOST_DELIVERIES.labels(saga, step, direction).inc()


def outbox_published(events: Iterable, *, now=None) -> None:
    """Count published events and observe how long each waited since it was committed."""
    if not enabled():
        return
    now = now or timezone.now()
    for event in events:
        OUTBOX_PUBLISHED.labels(event.aggregate_type).inc()
        OUTBOX_PUBLISH_LATENCY.observe(max(0.0, (now - event.created_at).total_seconds()))


def consumer_failed(consumer: str) -> None:
    if enabled():
        CONSUMER_FAILURES.labels(consumer).inc()


def consumer_gave_up(consumer: str) -> None:
    if enabled():
        CONSUMER_GIVE_UPS.labels(consumer).inc()


class Metrics(Interceptor):
    """Times each delivery and counts its outcome (sagas.interceptors). One per delivery."""

    def delivered(self, delivery: Delivery) -> None:
        self.started = time.perf_counter()

    def finished(self, delivery: Delivery, result: StepResult) -> None:
        saga, outcome = delivery.saga_name or "-", result.outcome.value
        STEP_DURATION.labels(saga, delivery.step_name, delivery.direction, outcome).observe(time.perf_counter() - self.started)
        if outcome == "retry":
            STEP_RETRIES.labels(saga, delivery.step_name, delivery.direction).inc()
        elif outcome == "failed" and delivery.direction != "forward":
            COMPENSATION_FAILURES.labels(saga, delivery.step_name).inc()


class DatabaseCollector:
    """The gauges read from the saga log and the outbox at scrape time. With the database down,
    only chainsaga_database_up 0: the processes' own metrics are still served."""

    def collect(self):
        try:
            gauges = list(self._gauges())
        except DatabaseError:
            gauges = []
        yield GaugeMetricFamily(f"{NAMESPACE}_database_up", "Whether /metrics could read the saga log", value=1 if gauges else 0)
        yield from gauges

    def _gauges(self):
        from sagas.selectors import outbox_stats, sagas_stuck
        from sagas.versions import versions_in_use

        now = timezone.now()
        sagas = GaugeMetricFamily(f"{NAMESPACE}_sagas", "Sagas in flight or FAILED (needing attention), by state", labels=["saga", "version", "state"])
        missing = GaugeMetricFamily(
            f"{NAMESPACE}_sagas_definition_missing", "Sagas in flight or FAILED whose definition this deployment lacks", labels=["saga", "version"],
        )
        for use in versions_in_use():
            for state, count in sorted(use.states().items()):
                sagas.add_metric([use.name, str(use.version), state], count)
            if use.definition is None:
                missing.add_metric([use.name, str(use.version)], use.in_flight + use.failed)
        yield sagas
        yield missing
        stuck = sagas_stuck(now=now).count()
        yield GaugeMetricFamily(f"{NAMESPACE}_sagas_stuck", "Sagas in flight that made no progress within their step timeout", value=stuck)
        outbox = outbox_stats(now=now)
        yield GaugeMetricFamily(f"{NAMESPACE}_outbox_backlog", "Committed outbox events not published yet (dead letters apart)", value=outbox["backlog"])
        yield GaugeMetricFamily(
            f"{NAMESPACE}_outbox_oldest_unpublished_age_seconds", "Age of the oldest event of the backlog", value=outbox["oldest_unpublished_age_s"],
        )
        yield GaugeMetricFamily(f"{NAMESPACE}_outbox_dead_letters", "Outbox events parked after too many failed publications", value=outbox["dead_lettered"])


def metrics_view(request: HttpRequest) -> HttpResponse:
    """GET /metrics: the Prometheus text format, for staff or with `Authorization: Bearer
    <METRICS_TOKEN>`; 401 without credentials, 403 for a user who is not staff."""
    token = settings.METRICS_TOKEN
    header = request.headers.get("Authorization", "")
    by_token = bool(token) and header.startswith("Bearer ") and hmac.compare_digest(header[7:].encode(), token.encode())
    if not by_token:
        user = getattr(request, "user", None)
        if user is None or not user.is_authenticated:
            response = JsonResponse({"detail": "Authentication credentials were not provided: log in as staff or send the metrics bearer token."}, status=401)
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
        if not user.is_staff:
            return JsonResponse({"detail": "Only staff may read the metrics."}, status=403)
    if request.method not in ("GET", "HEAD"):
        return JsonResponse({"detail": f"Method {request.method} not allowed."}, status=405, headers={"Allow": "GET, HEAD"})
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(DatabaseCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
