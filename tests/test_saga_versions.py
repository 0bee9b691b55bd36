"""Deploys while sagas are in flight: each saga finishes on the definition it started with, and a
deploy that would strand or silently change sagas in flight refuses to start (rule 14)."""

import re
from io import StringIO

import pytest
from django.core import checks
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from rest_framework.test import APIClient

from orders.models import OrderStatus
from sagas import dispatch
from sagas.models import SagaInstance, SagaState
from sagas.testing import CeleryWorker, timeline, wait_for_saga
from tests.engine_helpers import effects
from tests.orders_helpers import a_product, an_order
from tests.sagaapp import upgrade
from tests.sagaapp.sagas import four_steps
from tests.sagaapp.upgrade_v1 import upgrade_v1
from tests.sagaapp.upgrade_v2 import upgrade_v2

pytestmark = pytest.mark.django_db(transaction=True)

V1, V2, V1_CHANGED = "tests.sagaapp.upgrade_v1", "tests.sagaapp.upgrade_v2", "tests.sagaapp.upgrade_v1_changed"


def saga_check() -> list[checks.CheckMessage]:
    return checks.run_checks(tags=["sagas"])


def a_saga_in_flight(definition=four_steps, monkeypatch=None) -> SagaInstance:
    """Started, its first message never sent (no worker runs it): in flight for as long as the test needs."""
    with monkeypatch.context() as lost:
        lost.setattr(dispatch, "send_forward", lambda *args, **kwargs: None)
        return definition.start(input={})


def versions_table() -> str:
    out = StringIO()
    call_command("sagas", "versions", stdout=out)
    return out.getvalue()


def version_row(name: str, version: int) -> dict[str, str]:
    header, *rows = [re.split(r"\s{2,}", line) for line in versions_table().splitlines()]
    [row] = [row for row in rows if row[:2] == [name, str(version)]]
    return dict(zip(header, row))


# --- the system check and `manage.py sagas versions` -----------------------------------------------


def test_sagas_in_flight_on_the_registered_definitions_pass_the_check(monkeypatch):
    a_saga_in_flight(monkeypatch=monkeypatch)

    assert saga_check() == []


def test_sagas_in_flight_on_a_version_this_deployment_dropped_fail_the_check_naming_saga_version_and_count(monkeypatch):
    for _ in range(2):
        saga = a_saga_in_flight(monkeypatch=monkeypatch)
        SagaInstance.objects.filter(pk=saga.pk).update(version=99)  # as if v99 was removed by the deploy

    [error] = saga_check()

    assert error.id == "sagas.E001" and error.is_serious()
    assert "2 saga(s) of test_four_steps v99 are in flight (2 PENDING)" in error.msg
    assert version_row("test_four_steps", 99)["status"] == "STRANDED: register it again"


def test_a_version_changed_in_place_under_sagas_in_flight_fails_the_check_until_adopted(monkeypatch):
    saga = a_saga_in_flight(monkeypatch=monkeypatch)
    SagaInstance.objects.filter(pk=saga.pk).update(definition_fingerprint="0" * 64)  # started on another v1

    [error] = saga_check()
    assert error.id == "sagas.E002"
    assert "1 saga(s) of test_four_steps v1 in flight started on another definition" in error.msg
    assert version_row("test_four_steps", 1)["status"] == "CHANGED for 1 in flight: bump the version"

    call_command("sagas", "versions", "--adopt", "test_four_steps", "1", stdout=StringIO())

    assert saga_check() == []
    assert SagaInstance.objects.get(pk=saga.pk).definition_fingerprint == four_steps.fingerprint


def test_failed_sagas_of_a_dropped_version_only_warn(monkeypatch):
    saga = a_saga_in_flight(monkeypatch=monkeypatch)
    SagaInstance.objects.filter(pk=saga.pk).update(version=99, state=SagaState.FAILED, failure_reason="undo failed")

    [warning] = saga_check()

    assert warning.id == "sagas.W001" and not warning.is_serious()


def test_migrate_refuses_to_run_while_sagas_in_flight_would_be_stranded(monkeypatch):
    saga = a_saga_in_flight(monkeypatch=monkeypatch)
    SagaInstance.objects.filter(pk=saga.pk).update(version=99)

    with pytest.raises(SystemCheckError, match="sagas.E001"):
        call_command("migrate", verbosity=0, skip_checks=False)  # as `manage.py migrate` runs it


# --- operator actions on a saga whose definition is gone --------------------------------------------


def test_cancel_and_abort_of_a_saga_whose_definition_is_gone_answer_409_with_the_reason(monkeypatch):
    a_product()
    with monkeypatch.context() as lost:
        lost.setattr(dispatch, "send_forward", lambda *args, **kwargs: None)
        order = an_order()
    SagaInstance.objects.filter(pk=order.saga_id).update(version=99)
    customer, staff = APIClient(), APIClient()
    customer.force_authenticate(order.owner)
    staff.force_authenticate(get_user_model().objects.create(username="ops", is_staff=True, is_superuser=True))

    cancel = customer.post(f"/api/orders/{order.id}/cancel/")
    abort = staff.post(f"/api/sagas/{order.saga_id}/abort/")

    assert cancel.status_code == 409 and "cannot be cancelled right now" in cancel.json()["detail"]
    assert abort.status_code == 409 and "place_order v99 is not registered" in abort.json()["detail"]
    order.refresh_from_db()
    assert order.status == OrderStatus.PENDING


# --- the upgrade recipe, on real workers ---------------------------------------------------------------


def upgrade_worker(*modules: str) -> CeleryWorker:
    return CeleryWorker(queues=[upgrade.QUEUE], include=list(modules), concurrency=1)


def test_the_upgrade_recipe_v2_beside_v1_workers_first_drain_then_remove_v1(saga_worker):
    # Deploy 1: v1 only. A saga starts and is in flight (its last step still queued) when the
    # workers are stopped for the deploy.
    with upgrade_worker(V1) as deploy_1:
        old = upgrade_v1.start(input={"sleep": {"two": 2.0}})
        deploy_1.wait_for_output(f"saga={old.id} name={upgrade.NAME} v=1 step=two direction=forward from=delivered")
    # the warm shutdown let step two finish; step three waits in the queue
    assert SagaInstance.objects.get(pk=old.pk).state == SagaState.RUNNING

    # A deploy that drops v1, or changes v1 in place, refuses to start, naming saga, version and count.
    for modules, expected in [((V2,), "1 saga(s) of test_upgrade v1 are in flight"), ((V1_CHANGED,), "started on another definition")]:
        with pytest.raises(RuntimeError, match="refuses to start") as refused:
            upgrade_worker(*modules).start()
        assert expected in str(refused.value)

    # Deploy 2: v2 registered beside v1, workers first. The old saga finishes on v1, new ones run v2.
    with upgrade_worker(V1, V2):
        new = upgrade_v2.start(input={})
        old, new = wait_for_saga(old.id), wait_for_saga(new.id)
        assert (old.state, new.state) == (SagaState.COMPLETED, SagaState.COMPLETED), timeline(old.id) + timeline(new.id)
        assert [step for step, _ in effects(old.id)] == ["one", "two", "three"]
        assert [step for step, _ in effects(new.id)] == ["one", "two", "three", "four"]

    # Drained: none of v1 in flight, so deploy 3 may remove it.
    assert version_row(upgrade.NAME, 1)["in flight"] == "0"
    with upgrade_worker(V2) as deploy_3:
        assert deploy_3.alive
