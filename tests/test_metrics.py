"""/metrics (sagas.metrics): scraped after real sagas ran on a real worker, the counters and
histograms of the worker's pool processes and of this process add up, and the gauges read from
the saga log and the outbox say what is in flight, FAILED and waiting."""

import json
import re
import time
import uuid

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from prometheus_client import Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from sagas import metrics

from sagas.models import Direction, FaultKind, SagaState
from sagas.outbox import outbox_emit
from sagas.relay import outbox_relay
from sagas.testing import inject_fault, timeline, wait_for_saga
from tests.sagaapp.sagas import four_steps
from tests.test_outbox_relay import Recorder

pytestmark = pytest.mark.django_db(transaction=True)


def scrape(client) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.content[:500]
    assert response["Content-Type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.content.decode())
        for sample in family.samples
    }


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def staff_client(client):
    staff = get_user_model().objects.create_user(f"ops-{uuid.uuid4().hex[:6]}", password="x", is_staff=True)
    client.force_login(staff)
    return client


def wait_for_metric(client, check, timeout: float = 15.0):
    """The worker records a delivery just after its transaction commits: poll until it shows."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(client)
        if check(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_sagas_and_steps_run_on_a_worker_are_counted_timed_and_shown_in_flight(saga_worker, client):
    client = staff_client(client)
    saga_labels = {"saga": four_steps.name, "version": str(four_steps.version)}
    before = scrape(client)

    completed = wait_for_saga(four_steps.start(input={}).id)
    inject_fault(four_steps.name, "charge", kind=FaultKind.TRANSIENT, times=2)
    retried = wait_for_saga(four_steps.start(input={}).id)
    inject_fault(four_steps.name, "ship", kind=FaultKind.BUSINESS)
    compensated = wait_for_saga(four_steps.start(input={}).id)
    inject_fault(four_steps.name, "ship", kind=FaultKind.BUSINESS)
    inject_fault(four_steps.name, "charge", kind=FaultKind.TRANSIENT, times=None, direction=Direction.COMPENSATE)
    failed = wait_for_saga(four_steps.start(input={}).id)
    assert [s.state for s in (completed, retried, compensated, failed)] == [
        SagaState.COMPLETED, SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.FAILED
    ], timeline(failed.id)

    def delta(samples, name, **labels):
        return value(samples, name, **labels) - value(before, name, **labels)

    finished = "chainsaga_sagas_finished_total"
    after = wait_for_metric(client, lambda s: delta(s, finished, **saga_labels, outcome=SagaState.FAILED) == 1)
    assert delta(after, "chainsaga_sagas_started_total", **saga_labels) == 4
    assert delta(after, finished, **saga_labels, outcome=SagaState.COMPLETED) == 2
    assert delta(after, finished, **saga_labels, outcome=SagaState.COMPENSATED) == 1
    assert delta(after, finished, **saga_labels, outcome=SagaState.FAILED) == 1
    steps = "chainsaga_step_duration_seconds_count"
    assert delta(after, steps, saga=four_steps.name, step="reserve", direction="forward", outcome="done") == 4
    assert delta(after, steps, saga=four_steps.name, step="charge", direction="forward", outcome="retry") == 2
    assert delta(after, steps, saga=four_steps.name, step="ship", direction="forward", outcome="failed") == 2
    assert delta(after, "chainsaga_step_retries_total", saga=four_steps.name, step="charge", direction="forward") == 2
    assert delta(after, "chainsaga_compensation_failures_total", saga=four_steps.name, step="charge") == 1
    assert delta(after, "chainsaga_step_duration_seconds_sum", saga=four_steps.name, step="reserve", direction="forward", outcome="done") > 0
    # Gauges read from the saga log: the one FAILED saga needs attention; nothing else in flight.
    assert value(after, "chainsaga_sagas", **saga_labels, state=SagaState.FAILED) == 1
    assert value(after, "chainsaga_sagas", **saga_labels, state=SagaState.RUNNING) == 0
    assert value(after, "chainsaga_sagas_stuck") == 0
    assert value(after, "chainsaga_database_up") == 1


def test_outbox_backlog_age_publications_and_latency():
    from django.test import Client

    client = staff_client(Client())
    before = scrape(client)
    with transaction.atomic():
        for n in range(3):
            outbox_emit(aggregate_type="metered", aggregate_id="m-1", event_type=f"E{n}", payload={})
    time.sleep(0.2)

    waiting = scrape(client)
    assert value(waiting, "chainsaga_outbox_backlog") == 3
    assert value(waiting, "chainsaga_outbox_oldest_unpublished_age_seconds") >= 0.2

    assert outbox_relay(publisher=Recorder()).published == 3
    after = scrape(client)
    assert value(after, "chainsaga_outbox_backlog") == 0
    assert value(after, "chainsaga_outbox_published_total", aggregate_type="metered") - value(
        before, "chainsaga_outbox_published_total", aggregate_type="metered"
    ) == 3
    latency = "chainsaga_outbox_publish_latency_seconds"
    assert value(after, f"{latency}_count") - value(before, f"{latency}_count") == 3
    assert value(after, f"{latency}_sum") - value(before, f"{latency}_sum") >= 3 * 0.2


def test_metrics_are_for_staff_or_the_bearer_token(client, settings):
    settings.METRICS_TOKEN = "s3cret-token"
    anonymous = client.get("/metrics")
    assert anonymous.status_code == 401 and "log in as staff" in anonymous.json()["detail"]
    assert anonymous["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong-token").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-token").status_code == 200

    customer = get_user_model().objects.create_user("customer-metrics", password="x")
    client.force_login(customer)
    assert client.get("/metrics").status_code == 403
    settings.METRICS_TOKEN = ""
    client.logout()
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 401, "no token configured: none is accepted"


def test_the_grafana_dashboard_reads_only_metrics_that_exist():
    dashboard = json.loads((settings.BASE_DIR / "docs" / "grafana" / "chainsaga-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"] for name in re.findall(r"chainsaga_\w+", target["expr"])}
    recorded = [m for m in vars(metrics).values() if isinstance(m, (Counter, Histogram))]
    suffixes = {Counter: ("_total",), Histogram: ("_bucket", "_count", "_sum")}
    exist = {f"{m._name}{suffix}" for m in recorded for suffix in suffixes[type(m)]}
    exist |= {family.name for family in metrics.DatabaseCollector().collect()}
    assert used and used <= exist, used - exist
    assert {"chainsaga_sagas_finished_total", "chainsaga_step_duration_seconds_bucket", "chainsaga_outbox_backlog"} <= used
