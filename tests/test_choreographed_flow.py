"""The same order process as a choreography: services react to each other's events, delivered by
the outbox relay to consumers behind inboxes, on a real worker."""

import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from inventory.models import Stock
from orders.models import Flow, Order, OrderStatus
from orders.selectors import order_events
from payments.gateway import SimulatedProvider
from payments.models import Payment, Refund
from sagas.models import InboxMessage, OutboxEvent
from sagas.publishers import ConsumerTaskPublisher, RedisStreamPublisher
from tests.engine_helpers import wait_for_empty_queue
from tests.orders_helpers import a_product, a_user, assert_shop_invariants, charged_minus_refunded

pytestmark = pytest.mark.django_db(transaction=True)

HAPPY = ["ORDER_CREATED", "PAYMENT_PROCESSED", "INVENTORY_RESERVED", "ORDER_CONFIRMED", "FULFILLMENT_REQUESTED"]


@pytest.fixture(autouse=True)
def provider():
    provider = SimulatedProvider(settings.PAYMENTS_PROVIDER_PATH)
    provider.reset()
    return provider


def a_choreographed_order(*, sku: str, quantity: int = 2, payment_method: str = "pm_ok") -> Order:
    from orders.services import LineRequest, order_place

    return order_place(
        owner=a_user(), lines=[LineRequest(sku, quantity)], payment_method=payment_method,
        flow=Flow.CHOREOGRAPHED, idempotency_key=f"choreo-{payment_method}-{time.monotonic_ns()}",
    ).order


def settled(order: Order, *, events: list[str], timeout: float = 60) -> Order:
    """Wait until the order's event history is exactly `events`, all published, then a moment more."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = list(order_events(order.id))
        if [e.event_type for e in history] == events and all(e.published_at for e in history):
            time.sleep(0.3)
            order.refresh_from_db()
            return order
        time.sleep(0.1)
    raise AssertionError(f"order {order.id} events {[e.event_type for e in order_events(order.id)]}, wanted {events}")


def test_a_paid_order_is_confirmed_through_events_alone(saga_worker):
    product = a_product(on_hand=10)

    order = settled(a_choreographed_order(sku=product.sku, quantity=3), events=HAPPY)

    assert (order.status, order.saga_id) == (OrderStatus.CONFIRMED, None)
    stock = Stock.objects.get(pk=product.pk)
    assert (stock.on_hand, stock.reserved) == (7, 0)
    assert charged_minus_refunded(order) == order.total
    assert_shop_invariants()


@pytest.mark.parametrize("method", ["pm_declined", "pm_insufficient_funds"])
def test_a_refused_payment_cancels_the_order_without_touching_stock(saga_worker, method):
    product = a_product(on_hand=10)

    order = settled(a_choreographed_order(sku=product.sku, payment_method=method), events=["ORDER_CREATED", "PAYMENT_FAILED", "ORDER_CANCELLED"])

    assert order.status == OrderStatus.CANCELLED and "payment failed" in order.cancel_reason
    assert not Payment.objects.exists()
    assert Stock.objects.get(pk=product.pk).reserved == 0
    assert_shop_invariants()


@pytest.mark.parametrize("method", ["pm_flaky", "pm_timeout"])
def test_a_flaky_or_lost_payment_response_is_retried_and_charged_once(saga_worker, provider, method):
    product = a_product()

    order = settled(a_choreographed_order(sku=product.sku, payment_method=method), events=HAPPY)

    assert order.status == OrderStatus.CONFIRMED
    assert list(provider.charges().values()) == [order.total]
    assert_shop_invariants()


def test_stock_unavailable_after_payment_refunds_it_by_a_compensating_event(saga_worker, provider):
    product = a_product(on_hand=1)

    order = settled(
        a_choreographed_order(sku=product.sku, quantity=2),
        events=["ORDER_CREATED", "PAYMENT_PROCESSED", "STOCK_UNAVAILABLE", "ORDER_CANCELLED", "PAYMENT_REFUNDED"],
    )

    assert order.status == OrderStatus.CANCELLED and "stock unavailable" in order.cancel_reason
    assert Refund.objects.get().amount == order.total == Payment.objects.get().amount
    assert charged_minus_refunded(order) == 0
    assert_shop_invariants()


def test_every_event_delivered_twice_to_every_consumer_has_one_effect(saga_worker):
    ok, short = a_product("OK-1", on_hand=10), a_product("SHORT-1", on_hand=1)
    confirmed = settled(a_choreographed_order(sku=ok.sku), events=HAPPY)
    refunded = settled(
        a_choreographed_order(sku=short.sku, quantity=2),
        events=["ORDER_CREATED", "PAYMENT_PROCESSED", "STOCK_UNAVAILABLE", "ORDER_CANCELLED", "PAYMENT_REFUNDED"],
    )
    handled = InboxMessage.objects.count()

    ConsumerTaskPublisher().publish(list(OutboxEvent.objects.order_by("sequence")))  # the whole history again
    wait_for_empty_queue()

    assert InboxMessage.objects.count() == handled, "every redelivery was absorbed by an inbox"
    assert Payment.objects.count() == 2 and Refund.objects.count() == 1
    assert Stock.objects.get(pk=ok.pk).on_hand == 8
    assert (confirmed.status, refunded.status) == (OrderStatus.CONFIRMED, OrderStatus.CANCELLED)
    assert_shop_invariants()


@pytest.mark.services(reason="Redis Streams")
def test_the_order_stream_holds_each_orders_events_in_the_order_they_happened(saga_worker):
    product = a_product()
    publisher = RedisStreamPublisher(settings.REDIS_URL)

    order = settled(a_choreographed_order(sku=product.sku), events=HAPPY)

    mine = [f[b"type"].decode() for _, f in publisher.client.xrange("events.order") if f[b"aggregate_id"] == str(order.id).encode()]
    assert mine[: len(HAPPY)] == HAPPY


def test_a_payment_whose_every_answer_is_lost_is_refunded_by_its_key_and_the_order_cancelled(saga_worker, provider):
    from sagas.consumers import consumers_redeliver
    from sagas.models import ParkedDelivery

    product = a_product(on_hand=10)

    order = settled(
        a_choreographed_order(sku=product.sku, payment_method="pm_blackhole"),
        events=["ORDER_CREATED", "PAYMENT_REFUNDED", "PAYMENT_FAILED", "ORDER_CANCELLED"],
    )

    assert order.status == OrderStatus.CANCELLED and "could not be confirmed" in order.cancel_reason
    assert list(provider.charges().values()) == [order.total], "the provider did charge"
    assert list(provider.refunds().values()) == [order.total], "and payments found the charge by its key and refunded it"
    assert charged_minus_refunded(order) == 0
    parked = ParkedDelivery.objects.get(consumer="payments", aggregate_id=str(order.id))
    assert parked.event_type == "ORDER_CREATED" and parked.settled
    assert Stock.objects.get(pk=product.pk).reserved == 0
    later = timezone.now() + timedelta(hours=1)
    assert consumers_redeliver(now=later, min_age=timedelta(seconds=60), window=timedelta(hours=24)) == 0, "given up once, not resent"
    assert_shop_invariants()
