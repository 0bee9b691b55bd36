"""Operator actions need the same model permissions in the staff API as in the admin: being staff
is not enough. Reading the saga log needs `sagas.view_sagainstance`, the dead letter
`sagas.view_outboxevent`; retry, abort and replay need their own permission on top of the read one
(in the admin, the actions sit on the list). Superusers hold them all.

No worker: sagas are moved on with the runner in this process, as in tests/test_admin.py."""

import uuid

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from sagas import runner
from sagas.definition import COMPENSATE
from sagas.consumers import consumer_give_up
from sagas.models import OutboxEvent, ParkedDelivery, SagaInstance, SagaState
from sagas.publishers import message
from sagas.relay import outbox_relay
from sagas.services import saga_abort
from sagas.testing import inject_fault
from tests.orders_helpers import a_product, a_staff_user, a_user, an_order
from tests.test_admin import a_running_order, changelist, run, run_action, saga_of
from tests.test_orders_api import api_as
from tests.test_outbox_relay import Recorder, emit

pytestmark = pytest.mark.django_db

VIEW_SAGA, RETRY, ABORT = "sagas.view_sagainstance", "sagas.retry_saga", "sagas.abort_saga"
VIEW_OUTBOX, REPLAY = "sagas.view_outboxevent", "sagas.replay_outboxevent"
VIEW_PARKED, REPLAY_PARKED = "sagas.view_parkeddelivery", "sagas.replay_parkeddelivery"

# method, path, the permissions it needs, the status it answers once through (a PENDING saga, a
# dead-lettered event): retry answers 409 because the saga has not FAILED, which is past the check.
ENDPOINTS = [
    ("get", "/api/sagas/", (VIEW_SAGA,), 200),
    ("get", "/api/sagas/{saga}/", (VIEW_SAGA,), 200),
    ("post", "/api/sagas/{saga}/retry/", (VIEW_SAGA, RETRY), 409),
    ("post", "/api/sagas/{saga}/abort/", (VIEW_SAGA, ABORT), 202),
    ("get", "/api/outbox/dead-letter/", (VIEW_OUTBOX,), 200),
    ("post", "/api/outbox/{event}/replay/", (VIEW_OUTBOX, REPLAY), 202),
    ("get", "/api/consumers/parked/", (VIEW_PARKED,), 200),
    ("post", "/api/consumers/parked/{parked}/replay/", (VIEW_PARKED, REPLAY_PARKED), 202),
]
ENDPOINT_IDS = [f"{method} {path}" for method, path, _, _ in ENDPOINTS]


@pytest.fixture
def targets(settings):
    """A PENDING saga and a dead-lettered event for the endpoints to act on."""
    settings.OUTBOX_MAX_ATTEMPTS = 1
    a_product()
    order = an_order()
    poison = emit("poison")
    recorder = Recorder()
    recorder.failing.add("poison")
    outbox_relay(publisher=recorder, time_budget=0)
    assert OutboxEvent.objects.get(pk=poison.pk).dead_lettered_at is not None
    given_up = emit(str(uuid.uuid4()))  # the test consumer keys its effects by a UUID
    consumer_give_up(consumer="test-recorder", message=message(given_up), reason="parked for the test")
    return {"saga": order.saga_id, "event": poison.id, "parked": ParkedDelivery.objects.get().pk}


def call(client, method: str, path: str, targets):
    return getattr(client, method)(path.format(**targets))


def nothing_was_done(targets) -> bool:
    saga = SagaInstance.objects.get(pk=targets["saga"])
    event = OutboxEvent.objects.get(id=targets["event"])
    return saga.state == SagaState.PENDING and event.dead_lettered_at is not None and ParkedDelivery.objects.filter(pk=targets["parked"]).exists()


# --- the staff API ------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, needed, through", ENDPOINTS, ids=ENDPOINT_IDS)
def test_a_staff_user_with_no_permission_gets_403_and_nothing_happens(targets, method, path, needed, through):
    staff = api_as(a_staff_user())

    response = call(staff, method, path, targets)

    assert response.status_code == 403, response.content
    assert all(permission in response.json()["detail"] for permission in needed)
    assert nothing_was_done(targets)


@pytest.mark.parametrize("method, path, needed, through", ENDPOINTS, ids=ENDPOINT_IDS)
def test_a_staff_user_missing_one_of_the_permissions_gets_403(targets, method, path, needed, through):
    for missing in needed:
        held = tuple(p for p in needed if p != missing)
        staff = api_as(a_staff_user(f"ops-without-{missing}", permissions=held))

        response = call(staff, method, path, targets)

        assert response.status_code == 403, (missing, response.content)
    assert nothing_was_done(targets)


@pytest.mark.parametrize("method, path, needed, through", ENDPOINTS, ids=ENDPOINT_IDS)
def test_a_staff_user_with_the_permissions_gets_through(targets, method, path, needed, through):
    staff = api_as(a_staff_user(permissions=needed))

    response = call(staff, method, path, targets)

    assert response.status_code == through, response.content


@pytest.mark.parametrize("method, path, needed, through", ENDPOINTS, ids=ENDPOINT_IDS)
def test_a_superuser_gets_through_without_explicit_permissions(targets, method, path, needed, through):
    root = a_user("root", staff=True)
    root.is_superuser = True
    root.save()

    response = call(api_as(root), method, path, targets)

    assert response.status_code == through, response.content


def test_the_operator_permissions_have_names_an_operator_can_read_in_the_admin():
    names = dict(Permission.objects.filter(content_type__app_label="sagas").values_list("codename", "name"))

    assert names["retry_saga"] == "Can retry saga compensation"
    assert names["abort_saga"] == "Can abort saga"
    assert names["redrive_saga"] == "Can re-drive saga"
    assert names["replay_outboxevent"] == "Can replay outbox event from the dead letter"


# --- the admin's actions ------------------------------------------------------------------------


def logged_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def offered_actions(client, model) -> set[str]:
    page = client.get(changelist(model))
    assert page.status_code == 200
    return set(page.context["cl"].model_admin.get_actions(page.wsgi_request))


def a_failed_order():
    """An order whose saga was aborted and whose compensation then failed for good: FAILED."""
    order = a_running_order()
    inject_fault("place_order", "create_order", kind="business", direction=COMPENSATE, saga_id=order.saga_id)
    saga_abort(saga_id=order.saga_id)
    run(order, "create_order", COMPENSATE)
    runner.step_failure_handle(saga_id=order.saga_id, step_name="create_order", direction=COMPENSATE, failed_task_id="t-1")
    assert saga_of(order).state == SagaState.FAILED
    return order


def test_the_admin_abort_action_needs_the_abort_permission_not_the_change_one():
    a_product()
    order = a_running_order()
    editor = logged_in(a_staff_user("editor", permissions=(VIEW_SAGA, "sagas.change_sagainstance")))
    aborter = logged_in(a_staff_user("aborter", permissions=(VIEW_SAGA, ABORT)))

    offered_to_editor = offered_actions(editor, SagaInstance)
    run_action(editor, SagaInstance, "abort", [saga_of(order)])
    state_after_editor = saga_of(order).state
    offered_to_aborter = offered_actions(aborter, SagaInstance)
    run_action(aborter, SagaInstance, "abort", [saga_of(order)])

    assert "abort" not in offered_to_editor and state_after_editor == SagaState.RUNNING
    assert offered_to_aborter == {"abort"}
    assert saga_of(order).state == SagaState.COMPENSATING


def test_the_admin_retry_action_needs_the_retry_permission():
    a_product()
    order = a_failed_order()
    aborter = logged_in(a_staff_user("aborter", permissions=(VIEW_SAGA, ABORT)))
    retrier = logged_in(a_staff_user("retrier", permissions=(VIEW_SAGA, RETRY)))

    run_action(aborter, SagaInstance, "retry_compensation", [saga_of(order)])
    state_after_aborter = saga_of(order).state
    offered_to_retrier = offered_actions(retrier, SagaInstance)
    run_action(retrier, SagaInstance, "retry_compensation", [saga_of(order)])

    assert state_after_aborter == SagaState.FAILED
    assert offered_to_retrier == {"retry_compensation"}
    assert saga_of(order).state == SagaState.COMPENSATING


def test_the_admin_replay_action_needs_the_replay_permission(targets):
    event = OutboxEvent.objects.get(id=targets["event"])
    viewer = logged_in(a_staff_user("viewer", permissions=(VIEW_OUTBOX,)))
    replayer = logged_in(a_staff_user("replayer", permissions=(VIEW_OUTBOX, REPLAY)))

    offered_to_viewer = offered_actions(viewer, OutboxEvent)
    run_action(viewer, OutboxEvent, "replay", [event])
    parked_after_viewer = OutboxEvent.objects.get(pk=event.pk).dead_lettered_at is not None
    run_action(replayer, OutboxEvent, "replay", [event])

    assert "replay" not in offered_to_viewer and parked_after_viewer
    assert OutboxEvent.objects.get(pk=event.pk).dead_lettered_at is None


def test_the_admin_offers_a_superuser_every_saga_and_outbox_action():
    root = a_user("root", staff=True)
    root.is_superuser = True
    root.save()
    client = logged_in(root)

    assert offered_actions(client, SagaInstance) == {"abort", "retry_compensation"}
    assert offered_actions(client, OutboxEvent) == {"replay"}
