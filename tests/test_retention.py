"""History retention across the apps: an order whose saga was pruned keeps a summary of it, and
the order API and admin still tell its story; settled reservations and old Idempotency-Keys are
pruned in batches, held reservations never. Orders are built with the real services and their
sagas moved on with the real runner in this process (tests.test_admin); time passes by moving the
finish times back."""

from datetime import timedelta

import pytest
from django.utils import timezone

from inventory import tasks as inventory_tasks
from inventory.models import Reservation, ReservationStatus
from inventory.services import reservations_prune
from orders import tasks as orders_tasks
from orders.models import IdempotencyRecord, Order, OrderStatus
from orders.selectors import order_reservation_violations, order_saga_mismatches, stock_violations
from orders.services import LineRequest, idempotency_records_prune, order_place
from sagas.models import HousekeepingRun, SagaInstance, SagaState
from sagas.retention import sagas_prune
from tests.orders_helpers import a_product, an_order
from tests.test_admin import a_confirmed_order, a_refunded_order, a_running_order, change_page, changelist, run

pytestmark = pytest.mark.django_db

RETENTION = timedelta(days=30)
ORDERS = "/api/orders/"


def finished_long_ago(order: Order, days: float = 40):
    finished_at = timezone.now() - timedelta(days=days)
    SagaInstance.objects.filter(pk=order.saga_id).update(finished_at=finished_at)
    return finished_at


@pytest.fixture
def pruned():
    a_product()
    confirmed, refunded = a_confirmed_order(key="confirmed"), a_refunded_order()
    sagas = {"confirmed": confirmed.saga_id, "refunded": refunded.saga_id}
    finished = {"confirmed": finished_long_ago(confirmed), "refunded": finished_long_ago(refunded)}
    assert sagas_prune(now=timezone.now(), retention=RETENTION).deleted == 2
    confirmed.refresh_from_db()
    refunded.refresh_from_db()
    return {"confirmed": confirmed, "refunded": refunded, "sagas": sagas, "finished": finished}


def test_an_order_whose_saga_was_pruned_keeps_which_saga_it_was_how_and_when_it_ended(pruned):
    confirmed, refunded = pruned["confirmed"], pruned["refunded"]

    assert not SagaInstance.objects.filter(pk__in=pruned["sagas"].values()).exists()
    assert (confirmed.saga_id, confirmed.pruned_saga_id, confirmed.saga_outcome) == (None, pruned["sagas"]["confirmed"], SagaState.COMPLETED)
    assert (refunded.saga_id, refunded.pruned_saga_id, refunded.saga_outcome) == (None, pruned["sagas"]["refunded"], SagaState.COMPENSATED)
    assert (confirmed.saga_finished_at, refunded.saga_finished_at) == (pruned["finished"]["confirmed"], pruned["finished"]["refunded"])
    assert refunded.saga_failure_reason == "test" and refunded.cancel_reason, "staff's reason and the customer's"
    assert confirmed.status == OrderStatus.CONFIRMED and refunded.status == OrderStatus.CANCELLED
    orders = Order.objects.filter(pk__in=[confirmed.pk, refunded.pk])
    assert order_saga_mismatches(orders) == [] and order_reservation_violations(orders) == []


def test_the_order_api_shows_an_order_whose_saga_was_pruned_with_its_summary(pruned, client):
    confirmed = pruned["confirmed"]
    client.force_login(confirmed.owner)

    detail = client.get(f"{ORDERS}{confirmed.id}/")
    listed = client.get(ORDERS)

    assert detail.status_code == 200 and listed.status_code == 200
    body = detail.json()
    assert body["saga"] is None
    assert body["saga_summary"]["id"] == str(pruned["sagas"]["confirmed"]) and body["saga_summary"]["state"] == "COMPLETED"
    assert body["saga_summary"]["finished_at"] is not None
    assert [e["event_type"] for e in body["events"]][:1] == ["ORDER_CREATED"], "the events are the outbox's to keep"
    assert {o["id"] for o in listed.json()["results"]} == {str(pruned["confirmed"].id), str(pruned["refunded"].id)}


def test_an_order_whose_saga_is_kept_has_no_summary(client):
    a_product()
    order = a_confirmed_order()
    client.force_login(order.owner)

    body = client.get(f"{ORDERS}{order.id}/").json()

    assert body["saga"]["state"] == "COMPLETED" and body["saga_summary"] is None


def test_the_admin_shows_an_order_whose_saga_was_pruned(pruned, admin_client):
    refunded = pruned["refunded"]

    page = admin_client.get(change_page(refunded))
    listed = admin_client.get(changelist(Order))

    assert page.status_code == 200 and listed.status_code == 200
    text = page.content.decode()
    assert str(pruned["sagas"]["refunded"]) in text and "COMPENSATED" in text and "its log was pruned" in text
    assert admin_client.get(changelist(Order), {"q": str(refunded.id)}).status_code == 200


def test_a_running_orders_saga_is_never_pruned_however_old():
    a_product()
    running = a_running_order()
    SagaInstance.objects.filter(pk=running.saga_id).update(created_at=timezone.now() - timedelta(days=400))

    assert sagas_prune(now=timezone.now(), retention=RETENTION).deleted == 0
    running.refresh_from_db()
    assert running.saga_id is not None and running.saga_outcome == ""


# --- reservations and Idempotency-Keys -----------------------------------------------------------------


def settled_days_ago(days: float) -> None:
    Reservation.objects.update(updated_at=timezone.now() - timedelta(days=days))


def test_settled_reservations_past_the_retention_are_pruned_in_batches_and_held_ones_never():
    a_product(on_hand=100)
    a_confirmed_order(key="c")
    a_refunded_order()
    run(a_running_order(key="r"), "reserve_inventory")
    settled_days_ago(40)
    assert set(Reservation.objects.values_list("status", flat=True)) == {
        ReservationStatus.COMMITTED, ReservationStatus.RELEASED, ReservationStatus.RESERVED
    }

    first = reservations_prune(now=timezone.now(), retention=RETENTION, batch_size=1, time_budget=0)
    second = reservations_prune(now=timezone.now(), retention=RETENTION, batch_size=1, time_budget=60)

    assert (first.deleted, first.more, second.deleted, second.more) == (1, True, 1, False)
    assert list(Reservation.objects.values_list("status", flat=True)) == [ReservationStatus.RESERVED]
    assert stock_violations() == [], "the stock still adds up: only what was held counts"


def test_a_recent_settled_reservation_is_kept():
    a_product()
    a_confirmed_order()
    settled_days_ago(29)

    assert reservations_prune(now=timezone.now(), retention=RETENTION).deleted == 0


def test_an_idempotency_key_past_the_retention_is_forgotten_and_places_a_new_order():
    a_product()
    first = an_order(key="again")
    IdempotencyRecord.objects.update(created_at=timezone.now() - timedelta(days=40))

    pruned = idempotency_records_prune(now=timezone.now(), retention=RETENTION)
    again = order_place(owner=first.owner, lines=[LineRequest("SKU-1", 2)], payment_method="pm_ok", idempotency_key="again")

    assert pruned.deleted == 1
    assert Order.objects.filter(pk=first.pk).exists(), "the order stays"
    assert not again.replayed and again.order.pk != first.pk


def test_a_recent_idempotency_key_is_kept_and_still_replays():
    a_product()
    first = an_order(key="kept")

    pruned = idempotency_records_prune(now=timezone.now(), retention=RETENTION)
    again = order_place(owner=first.owner, lines=[LineRequest("SKU-1", 2)], payment_method="pm_ok", idempotency_key="kept")

    assert pruned.deleted == 0 and again.replayed and again.order.pk == first.pk


def test_the_apps_prune_tasks_record_their_runs(settings):
    a_product()
    an_order(key="old")
    IdempotencyRecord.objects.update(created_at=timezone.now() - timedelta(days=400))
    settings.ORDER_IDEMPOTENCY_RETENTION_DAYS = settings.INVENTORY_RESERVATION_RETENTION_DAYS = 30

    deleted = orders_tasks.prune_idempotency_records(), inventory_tasks.prune_reservations()

    assert deleted == (1, 0)
    runs = dict(HousekeepingRun.objects.values_list("task", "count"))
    assert runs == {"orders.prune_idempotency_records": 1, "inventory.prune_reservations": 0}
