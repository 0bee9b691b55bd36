"""The Django admin: every page answers, the saga filters and actions go through the engine's
services, and nothing a service owns (money, status, the saga log) can be edited.

Data is built with the real services, and sagas are moved on with the real runner in this process
(one delivery per step, as the run_step task makes it): no worker is needed, and the messages the
engine would send after commit are never sent, because these tests' transactions never commit.
"""

import re
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib import admin, messages
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from inventory.models import Product, Reservation, ReservationStatus, Stock
from orders.admin import OrderAdmin
from orders.models import Order, OrderStatus
from payments.models import Payment, PaymentStatus, Refund
from sagas import runner
from sagas.consumers import consume, consumer_give_up
from sagas.definition import COMPENSATE, FORWARD
from sagas.heartbeat import Heartbeat
from sagas.models import (
    Fault,
    InboxMessage,
    OutboxEvent,
    ParkedDelivery,
    RejectedMessage,
    SagaInstance,
    SagaState,
    StepExecution,
    StepState,
    WorkerHeartbeat,
)
from sagas.rejects import message_reject_record
from sagas.outbox import outbox_emit
from sagas.publishers import message
from sagas.services import saga_abort
from sagas.testing import inject_fault
from tests.orders_helpers import a_product, an_order

pytestmark = pytest.mark.django_db

STEPS = ["create_order", "reserve_inventory", "process_payment", "notify_fulfillment"]


def run(order: Order, step: str, direction: str = FORWARD, *, at=None) -> runner.StepResult:
    """One delivery of a step of the order's saga; `at` fixes the clock the runner sees."""
    clock = (lambda: at) if at else timezone.now
    return runner.step_run(saga_id=order.saga_id, step_name=step, direction=direction, republish=lambda: None, clock=clock)


def a_running_order(*, at=None, key=None) -> Order:
    """A pending order whose saga completed create_order and is RUNNING."""
    order = an_order(key=key)
    run(order, "create_order", at=at)
    return order


def a_confirmed_order(*, at=None, key=None) -> Order:
    order = an_order(key=key)
    for step in STEPS:
        run(order, step, at=at)
    order.refresh_from_db()
    assert order.status == OrderStatus.CONFIRMED
    return order


def a_refunded_order() -> Order:
    """Charged, then aborted: refunded, released and cancelled by the compensations."""
    order = an_order(key="refunded")
    for step in STEPS[:3]:
        run(order, step)
    saga_abort(saga_id=order.saga_id, reason="test")
    for step in reversed(STEPS[:3]):
        run(order, step, COMPENSATE)
    order.refresh_from_db()
    assert order.status == OrderStatus.CANCELLED
    return order


def saga_of(order: Order) -> SagaInstance:
    return SagaInstance.objects.get(pk=order.saga_id)


def changelist(model) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


def change_page(obj) -> str:
    return reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change", args=[obj.pk])


def shown(response) -> set:
    return {obj.pk for obj in response.context["cl"].result_list}


def messages_of(response) -> list[tuple[int, str]]:
    return [(m.level, str(m)) for m in response.context["messages"]]


def management_form(page: str, prefix: str) -> dict[str, str]:
    """The hidden management fields of an inline formset, as the browser would post them back."""
    return dict(re.findall(rf'name="({prefix}-[A-Z_]+)" value="(\d+)"', page))


def run_action(client, model, action: str, objects) -> object:
    data = {"action": action, admin.helpers.ACTION_CHECKBOX_NAME: [str(obj.pk) for obj in objects]}
    return client.post(changelist(model), data, follow=True)


@pytest.fixture
def shop():
    a_product()
    confirmed = a_confirmed_order(key="confirmed")
    refunded = a_refunded_order()
    running = a_running_order(key="running")
    inject_fault("place_order", "process_payment", kind="transient", saga_id=running.saga_id)
    return {"confirmed": confirmed, "refunded": refunded, "running": running}


# --- every page ------------------------------------------------------------------------------------


def test_every_page_of_every_registered_model_of_the_project_answers_200(admin_client, shop):
    with transaction.atomic():
        event = outbox_emit(aggregate_type="thing", aggregate_id=uuid.uuid4(), event_type="THING_HAPPENED", payload={})
    consume(consumer="test-recorder", message=message(event))  # an inbox row to show
    message_reject_record(reason="not JSON", body=b"garbage", queue="chainsaga")  # a rejected message
    with transaction.atomic():
        given_up = outbox_emit(aggregate_type="thing", aggregate_id=uuid.uuid4(), event_type="THING_HAPPENED", payload={})
    consumer_give_up(consumer="test-recorder", message=message(given_up), reason="failed 9 times")  # a parked delivery
    Heartbeat(hostname="worker@test", queues=["chainsaga"], interval=5).beat(now=timezone.now())  # a worker's
    project_models = {m for m in admin.site._registry if m._meta.app_label in {"sagas", "orders", "inventory", "payments"}}
    assert project_models == {
        SagaInstance, Fault, Order, Product, Payment, Refund, Reservation, OutboxEvent, InboxMessage, RejectedMessage, WorkerHeartbeat,
        ParkedDelivery,
    }

    for model in project_models:
        assert admin_client.get(changelist(model)).status_code == 200, model
        obj = model.objects.first()
        assert obj is not None, f"no {model.__name__} to show"
        response = admin_client.get(change_page(obj))
        assert response.status_code == 200, model


@pytest.mark.parametrize(
    "model, query",
    [
        (Order, "status=confirmed&flow=orchestrated"),
        (Order, "q=alice"),
        (Order, "created_at__gte=2000-01-01+00:00:00%2B00:00"),
        (SagaInstance, "state=RUNNING&stuck_for=5"),
        (SagaInstance, "name=place_order"),
        (SagaInstance, "stuck_for=not-a-number"),
        (Payment, "status=refunded"),
        (Refund, ""),
        (Product, "q=SKU"),
    ],
)
def test_filtered_and_searched_changelists_answer_200(admin_client, shop, model, query):
    assert admin_client.get(f"{changelist(model)}?{query}").status_code == 200


def test_orders_can_be_found_by_part_of_their_id_and_by_owner_username(admin_client, shop):
    confirmed = shop["confirmed"]

    by_id = admin_client.get(changelist(Order), {"q": str(confirmed.id)[:13]})
    by_owner = admin_client.get(changelist(Order), {"q": "alice"})
    by_stranger = admin_client.get(changelist(Order), {"q": "mallory"})

    assert shown(by_id) == {confirmed.id}
    assert shown(by_owner) == {o.id for o in shop.values()}
    assert shown(by_stranger) == set()


def test_orders_filter_by_status(admin_client, shop):
    response = admin_client.get(changelist(Order), {"status": OrderStatus.CANCELLED})

    assert shown(response) == {shop["refunded"].id}


def test_reservations_filter_by_status(admin_client, shop):
    response = admin_client.get(changelist(Reservation), {"status": ReservationStatus.RELEASED})

    assert shown(response) == {r.pk for r in Reservation.objects.filter(saga_id=shop["refunded"].saga_id)}
    assert shown(response)


# --- read-only: nothing a service owns is editable -------------------------------------------------


def test_the_order_change_page_has_no_editable_total_or_status(admin_client, shop):
    order = shop["running"]

    response = admin_client.get(change_page(order))

    content = response.content.decode()
    assert response.status_code == 200
    for field in ["total", "status", "currency", "owner", "saga"]:
        assert f'name="{field}"' not in content
    assert {"total", "status", "currency", "saga", "owner"} <= set(OrderAdmin(Order, admin.site).readonly_fields)


def test_posting_a_changed_total_or_status_to_an_order_changes_nothing(admin_client, shop):
    order = shop["running"]

    response = admin_client.post(change_page(order), {"total": "0.01", "status": OrderStatus.CONFIRMED, "currency": "USD"})

    assert response.status_code == 403
    after = Order.objects.get(pk=order.pk)
    assert (after.total, after.status, after.currency) == (order.total, OrderStatus.PENDING, order.currency)


@pytest.mark.parametrize("model", [Order, SagaInstance, Payment, Refund, Reservation])
def test_service_owned_rows_cannot_be_added_or_deleted_in_the_admin(admin_client, shop, model):
    opts = model._meta
    obj = model.objects.first()

    add = admin_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_add"))
    delete = admin_client.post(reverse(f"admin:{opts.app_label}_{opts.model_name}_delete", args=[obj.pk]), {"post": "yes"})

    assert add.status_code == 403
    assert delete.status_code == 403
    assert model.objects.filter(pk=obj.pk).exists()


def test_a_payment_and_its_refund_are_shown_read_only(admin_client, shop):
    payment = Payment.objects.get(reference=str(shop["refunded"].id))

    response = admin_client.post(change_page(payment), {"amount": "1.00", "status": PaymentStatus.SUCCEEDED})

    assert response.status_code == 403
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.REFUNDED
    page = admin_client.get(change_page(payment)).content.decode()
    assert payment.refund.provider_reference in page
    assert 'name="amount"' not in page


def test_a_product_added_in_the_admin_gets_an_empty_stock_row(admin_client):
    response = admin_client.post(
        reverse("admin:inventory_product_add"), {"sku": "NEW-1", "name": "New", "price": "3.50", "currency": "EUR"}
    )

    assert response.status_code == 302, response.content.decode()[-3000:]
    product = Product.objects.get(sku="NEW-1")
    assert product.price == Decimal("3.50")
    assert (product.stock.on_hand, product.stock.reserved) == (0, 0)


def test_a_product_can_be_renamed_and_repriced_but_its_stock_and_sku_stay(admin_client, shop):
    product = Product.objects.get(sku="SKU-1")
    stock_before = Stock.objects.values("on_hand", "reserved").get(pk=product.pk)

    page = admin_client.get(change_page(product)).content.decode()
    response = admin_client.post(
        change_page(product),
        {
            "sku": "HIJACKED",
            "name": "Renamed",
            "price": "12.00",
            "currency": "USD",
            **management_form(page, "stock"),
            "stock-0-product": str(product.pk),
            "stock-0-on_hand": "999",
            "stock-0-reserved": "0",
        },
    )

    assert 'name="on_hand"' not in page and 'name="stock-0-on_hand"' not in page
    assert response.status_code == 302, response.content.decode()[-3000:]
    product.refresh_from_db()
    assert (product.sku, product.name, product.price, product.currency) == ("SKU-1", "Renamed", Decimal("12.00"), "EUR")
    assert Stock.objects.values("on_hand", "reserved").get(pk=product.pk) == stock_before


def test_the_order_change_page_reads_its_lines_products_in_one_query_however_many_lines(admin_client):
    for sku in ("SKU-1", "SKU-2", "SKU-3"):
        a_product(sku)
    one_line = an_order(lines=(("SKU-1", 1),), key="one")
    three_lines = an_order(lines=(("SKU-1", 1), ("SKU-2", 1), ("SKU-3", 1)), key="three")

    def queries(order) -> list[str]:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(change_page(order)).status_code == 200
        return [q["sql"] for q in captured.captured_queries]

    assert len(queries(three_lines)) == len(queries(one_line))
    assert [sql for sql in queries(three_lines) if 'FROM "inventory_product"' in sql and "JOIN" not in sql] == []


# --- the order page's saga timeline ----------------------------------------------------------------


def test_an_orders_change_page_shows_its_saga_timeline_coloured_by_state(admin_client):
    a_product()
    order = an_order()
    run(order, "create_order")
    run(order, "reserve_inventory")

    content = admin_client.get(change_page(order)).content.decode()

    timeline = content[content.index('id="saga-timeline"'):]
    assert timeline.count("timeline-row state-completed") == 2
    assert timeline.count("timeline-row state-pending") == 2
    positions = [timeline.index(f"<td>{name}</td>") for name in STEPS]
    assert positions == sorted(positions), "rows in the order the steps started, unstarted last"
    assert "background:#2e7d32" in timeline  # COMPLETED is green
    assert "background:#757575" in timeline  # PENDING is grey


def test_the_timeline_shows_compensations_and_failures(admin_client):
    a_product()
    order = an_order(payment_method="pm_declined")
    for step in STEPS[:3]:
        run(order, step)
    runner.step_failure_handle(saga_id=order.saga_id, step_name="process_payment", direction=FORWARD, failed_task_id="t-1")

    timeline = admin_client.get(change_page(order)).content.decode().split('id="saga-timeline"')[1]

    assert "timeline-row state-failed" in timeline
    assert "background:#c62828" in timeline  # FAILED is red
    assert "PaymentDeclined" in timeline
    assert timeline.count("<td>compensate</td>") == 2, "release inventory and cancel order are pending"


# --- saga list filter: stuck for more than N minutes -----------------------------------------------


def test_the_stuck_filter_shows_active_sagas_without_progress_for_longer_than_n_minutes(admin_client):
    a_product()
    half_an_hour_ago = timezone.now() - timedelta(minutes=30)
    stuck = a_running_order(at=half_an_hour_ago, key="stuck")
    fresh = a_running_order(key="fresh")
    finished = a_confirmed_order(at=half_an_hour_ago, key="finished")
    assert (saga_of(stuck).state, saga_of(fresh).state, saga_of(finished).state) == (
        SagaState.RUNNING,
        SagaState.RUNNING,
        SagaState.COMPLETED,
    )

    over_15 = shown(admin_client.get(changelist(SagaInstance), {"stuck_for": "15"}))
    over_60 = shown(admin_client.get(changelist(SagaInstance), {"stuck_for": "60"}))
    unfiltered = shown(admin_client.get(changelist(SagaInstance)))

    assert over_15 == {stuck.saga_id}
    assert over_60 == set()
    assert unfiltered == {stuck.saga_id, fresh.saga_id, finished.saga_id}


# --- saga actions -----------------------------------------------------------------------------------


def test_aborting_a_running_saga_starts_its_compensation(admin_client):
    a_product()
    order = a_running_order()

    response = run_action(admin_client, SagaInstance, "abort", [saga_of(order)])

    saga = saga_of(order)
    assert saga.state == SagaState.COMPENSATING
    assert saga.failure_reason == "aborted by admin in the admin"
    compensations = StepExecution.objects.filter(saga=saga, direction=COMPENSATE)
    assert list(compensations.values_list("name", "state")) == [("create_order", StepState.PENDING)]
    assert messages_of(response) == [(messages.SUCCESS, f"saga {saga.id}: aborted, now COMPENSATING")]


def test_aborting_a_completed_saga_warns_and_changes_nothing(admin_client):
    a_product()
    saga = saga_of(a_confirmed_order())

    response = run_action(admin_client, SagaInstance, "abort", [saga])

    assert SagaInstance.objects.get(pk=saga.pk).state == SagaState.COMPLETED
    assert [level for level, _ in messages_of(response)] == [messages.WARNING]


def test_retrying_compensation_of_a_saga_that_is_not_failed_warns_and_changes_nothing(admin_client):
    a_product()
    saga = saga_of(a_running_order())
    steps_before = list(StepExecution.objects.filter(saga=saga).values())

    response = run_action(admin_client, SagaInstance, "retry_compensation", [saga])

    after = SagaInstance.objects.get(pk=saga.pk)
    assert (after.state, after.updated_at, after.failure_reason) == (SagaState.RUNNING, saga.updated_at, saga.failure_reason)
    assert list(StepExecution.objects.filter(saga=saga).values()) == steps_before
    assert messages_of(response) == [
        (messages.WARNING, f"saga {saga.id} is RUNNING; only a FAILED saga's compensation can be retried")
    ]


def test_retrying_a_failed_sagas_compensation_runs_it_again(admin_client):
    a_product()
    order = a_running_order()
    inject_fault("place_order", "create_order", kind="business", direction=COMPENSATE, saga_id=order.saga_id)
    saga_abort(saga_id=order.saga_id)
    run(order, "create_order", COMPENSATE)
    runner.step_failure_handle(saga_id=order.saga_id, step_name="create_order", direction=COMPENSATE, failed_task_id="t-1")
    assert saga_of(order).state == SagaState.FAILED

    response = run_action(admin_client, SagaInstance, "retry_compensation", [saga_of(order)])

    assert saga_of(order).state == SagaState.COMPENSATING
    assert StepExecution.objects.get(saga_id=order.saga_id, direction=COMPENSATE).state == StepState.PENDING
    assert [level for level, _ in messages_of(response)] == [messages.SUCCESS]


def test_saga_actions_are_not_offered_to_a_staff_user_who_may_only_view(client, django_user_model, shop):
    from django.contrib.auth.models import Permission

    viewer = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_sagainstance"))
    client.force_login(viewer)
    saga = saga_of(shop["running"])

    page = client.get(changelist(SagaInstance))
    client.post(changelist(SagaInstance), {"action": "abort", admin.helpers.ACTION_CHECKBOX_NAME: [str(saga.pk)]})

    assert page.status_code == 200
    assert "abort" not in dict(page.context["cl"].model_admin.get_action_choices(page.wsgi_request))
    assert saga_of(shop["running"]).state == SagaState.RUNNING


# --- order action: cancel ---------------------------------------------------------------------------


def test_cancelling_orders_reports_each_outcome_and_goes_through_the_order_service(admin_client, shop):
    running, confirmed, refunded = shop["running"], shop["confirmed"], shop["refunded"]
    not_started = an_order(key="not-started")

    response = run_action(admin_client, Order, "cancel_selected", [running, confirmed, refunded, not_started])

    assert saga_of(running).state == SagaState.COMPENSATING
    assert Order.objects.get(pk=running.pk).status == OrderStatus.PENDING, "cancelled once the compensation has run"
    assert Order.objects.get(pk=confirmed.pk).status == OrderStatus.CONFIRMED
    assert Order.objects.get(pk=not_started.pk).status == OrderStatus.CANCELLED
    reported = {text.split(" ")[1].rstrip(":"): (level, text) for level, text in messages_of(response)}
    assert reported[str(running.id)][0] == messages.SUCCESS
    assert "cancellation started, its saga is COMPENSATING" in reported[str(running.id)][1]
    assert reported[str(confirmed.id)] == (
        messages.WARNING,
        f"order {confirmed.id} is confirmed and can no longer be cancelled",
    )
    assert reported[str(refunded.id)] == (messages.INFO, f"order {refunded.id} was already cancelled")
    assert reported[str(not_started.id)] == (messages.SUCCESS, f"order {not_started.id} cancelled")


def test_the_user_list_counts_by_estimate_and_finds_a_user_by_exact_name_or_email(admin_client):
    from django.contrib.auth import get_user_model

    get_user_model().objects.create_user("carol", email="carol@example.com", password="x")
    found = admin_client.get(reverse("admin:auth_user_changelist"), {"q": "CAROL@example.com"})
    by_part = admin_client.get(reverse("admin:auth_user_changelist"), {"q": "caro"})

    assert [u.username for u in found.context["cl"].result_list] == ["carol"]
    assert list(by_part.context["cl"].result_list) == [], "no LIKE over the users: whole names only"
    assert found.context["cl"].show_full_result_count is False
