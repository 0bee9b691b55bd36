"""The place-order saga end to end on a real worker, for every payment method."""

from decimal import Decimal

import pytest
from django.conf import settings

from inventory.models import Stock
from orders.models import OrderStatus
from orders.selectors import order_events
from payments.gateway import SimulatedProvider
from payments.models import Payment, Refund
from sagas.models import Direction, SagaState, StepState
from sagas.testing import timeline, wait_for_saga
from tests.orders_helpers import a_product, an_order, assert_shop_invariants, charged_minus_refunded

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def provider():
    provider = SimulatedProvider(settings.PAYMENTS_PROVIDER_PATH)
    provider.reset()
    return provider


def finished(order):
    saga = wait_for_saga(order.saga_id, timeout=60)
    order.refresh_from_db()
    return order, saga


def test_an_order_paid_with_pm_ok_is_confirmed_and_its_units_leave_stock(saga_worker):
    product = a_product(on_hand=10)

    order, saga = finished(an_order(lines=[(product.sku, 3)], payment_method="pm_ok"))

    assert (order.status, saga.state) == (OrderStatus.CONFIRMED, SagaState.COMPLETED), timeline(saga.id)
    stock = Stock.objects.get(pk=product.pk)
    assert (stock.on_hand, stock.reserved) == (7, 0)
    assert charged_minus_refunded(order) == order.total == Decimal("30.00")
    assert_shop_invariants()


@pytest.mark.parametrize("method", ["pm_declined", "pm_insufficient_funds"])
def test_a_refused_payment_releases_the_stock_then_cancels_without_taking_money(saga_worker, method):
    product = a_product(on_hand=10)

    order, saga = finished(an_order(lines=[(product.sku, 3)], payment_method=method))

    assert (order.status, saga.state) == (OrderStatus.CANCELLED, SagaState.COMPENSATED), timeline(saga.id)
    undone = saga.steps.filter(direction=Direction.COMPENSATE).order_by("started_at")
    assert [s.name for s in undone] == ["reserve_inventory", "create_order"]
    assert saga.steps.get(name="process_payment").attempts == 1, "business failures are not retried"
    stock = Stock.objects.get(pk=product.pk)
    assert (stock.on_hand, stock.reserved) == (10, 0)
    assert not Payment.objects.exists()
    assert [e.event_type for e in order_events(order.id)] == [
        "ORDER_CREATED", "INVENTORY_RESERVED", "PAYMENT_FAILED", "INVENTORY_RELEASED", "ORDER_CANCELLED"
    ]
    assert_shop_invariants()


def test_a_flaky_provider_is_retried_and_charges_once(saga_worker, provider):
    product = a_product()

    order, saga = finished(an_order(lines=[(product.sku, 1)], payment_method="pm_flaky"))

    assert order.status == OrderStatus.CONFIRMED, timeline(saga.id)
    assert saga.steps.get(name="process_payment").attempts == 3
    assert len(provider.charges()) == 1
    assert_shop_invariants()


def test_a_lost_payment_response_is_reconciled_by_key_not_charged_twice(saga_worker, provider):
    product = a_product()

    order, saga = finished(an_order(lines=[(product.sku, 2)], payment_method="pm_timeout"))

    assert order.status == OrderStatus.CONFIRMED, timeline(saga.id)
    payment_step = saga.steps.get(name="process_payment")
    assert (payment_step.attempts, payment_step.state) == (2, StepState.COMPLETED)
    assert "GatewayTimeout" in payment_step.last_error
    assert list(provider.charges().values()) == [order.total]
    assert Payment.objects.get().amount == order.total
    assert_shop_invariants()


def test_an_order_for_more_than_is_in_stock_is_cancelled_without_touching_payment(saga_worker):
    product = a_product(on_hand=2)

    order, saga = finished(an_order(lines=[(product.sku, 3)]))

    assert (order.status, saga.state) == (OrderStatus.CANCELLED, SagaState.COMPENSATED), timeline(saga.id)
    assert "out of stock" in order.cancel_reason
    assert [e.event_type for e in order_events(order.id)] == ["ORDER_CREATED", "STOCK_UNAVAILABLE", "ORDER_CANCELLED"]
    assert saga.steps.get(name="process_payment").state == StepState.PENDING
    assert Stock.objects.get(pk=product.pk).reserved == 0
    assert_shop_invariants()


def test_a_failure_after_payment_refunds_it(saga_worker, provider):
    from sagas.testing import inject_fault

    product = a_product()
    inject_fault("place_order", "notify_fulfillment", kind="business")

    order, saga = finished(an_order(lines=[(product.sku, 1)]))

    assert order.status == OrderStatus.CANCELLED, timeline(saga.id)
    assert Refund.objects.get().amount == order.total
    assert charged_minus_refunded(order) == 0
    assert list(provider.refunds().values()) == [order.total]
    assert_shop_invariants()


def test_a_charge_whose_every_response_was_lost_is_found_by_key_and_refunded(saga_worker, provider):
    product = a_product(on_hand=10)

    order, saga = finished(an_order(lines=[(product.sku, 1)], payment_method="pm_blackhole"))

    assert (order.status, saga.state) == (OrderStatus.CANCELLED, SagaState.COMPENSATED), timeline(saga.id)
    payment_step = saga.steps.get(name="process_payment", direction=Direction.FORWARD)
    assert (payment_step.state, payment_step.outcome_uncertain) == (StepState.FAILED, True)
    undone = saga.steps.filter(direction=Direction.COMPENSATE).order_by("started_at")
    assert [s.name for s in undone] == ["process_payment", "reserve_inventory", "create_order"]
    assert list(provider.charges().values()) == [order.total], "the provider did charge"
    assert list(provider.refunds().values()) == [order.total], "and the refund found it by key"
    assert charged_minus_refunded(order) == 0
    assert_shop_invariants()
