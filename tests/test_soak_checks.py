"""The invariant checks the chaos soak (perf/chaos.py) relies on: each must see what it is for.
The soak itself runs in CI as `make chaos-short`, not here."""

import random
from datetime import timedelta
from decimal import Decimal

import pytest
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from inventory.models import Stock
from orders.models import OrderStatus
from orders.selectors import money_violations, order_saga_mismatches
from payments.gateway import SimulatedProvider
from payments.selectors import provider_ledger_violations, provider_net_by_reference
from payments.services import payment_charge
from perf.chaos import FULL, SHORT, fault_schedule
from sagas.models import OutboxEvent
from sagas.outbox import outbox_emit
from sagas.selectors import outbox_repeated_events, outbox_unpublished
from tests.orders_helpers import a_product, an_order

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def provider():
    provider = SimulatedProvider(settings.PAYMENTS_PROVIDER_PATH)
    provider.reset()
    return provider


def charge(key: str, reference: str, amount: str = "20.00"):
    return payment_charge(idempotency_key=key, reference=reference, amount=Decimal(amount), currency="EUR", method="pm_ok", now=timezone.now())


@pytest.mark.parametrize("plan", [SHORT, FULL], ids=["short", "full"])
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_every_fault_kind_strikes_inside_the_window_and_a_killed_worker_is_restarted(plan, broker):
    schedule = fault_schedule(plan, broker=broker, rng=random.Random(1))

    kinds = [f.kind for f in schedule]
    expected = {"child_kill", "worker_kill", "worker_restart", "redis_restart", "postgres_restart", "beat2_start", "beat2_stop"}
    assert expected <= set(kinds)
    assert ("broker_connections_close" in kinds) == (broker == "rabbitmq")
    assert kinds.index("worker_kill") < kinds.index("worker_restart")
    assert kinds.index("beat2_start") < kinds.index("beat2_stop")
    assert all(0 < f.at < 1.2 * plan.window for f in schedule)


def test_a_charge_the_provider_made_without_our_payment_row_is_a_violation(provider):
    provider.charge(key="saga-1:process_payment", amount=Decimal("20.00"), currency="EUR", method="pm_ok")

    violations = provider_ledger_violations()

    assert len(violations) == 1 and "we have no payment" in violations[0]


def test_a_charge_recorded_on_both_sides_is_not_a_violation_and_counts_for_its_order():
    with transaction.atomic():
        charge("saga-1:process_payment", "order-1")

    assert provider_ledger_violations() == []
    assert provider_net_by_reference() == {"order-1": Decimal("20.00")}


def test_one_order_charged_under_two_keys_is_a_double_charge():
    with transaction.atomic():
        charge("saga-1:process_payment", "order-1")
        charge("order-1:payment", "order-1")

    assert provider_ledger_violations() == ["order-1 was charged 2 times"]


def test_a_cancelled_order_that_kept_its_money_is_a_money_violation():
    a_product(price="10.00")
    order = an_order(lines=(("SKU-1", 2),))
    with transaction.atomic():
        charge("saga-x:process_payment", str(order.id))
    order.status = OrderStatus.CANCELLED
    order.save()

    violations = money_violations()  # (SQLite sums to 20, PostgreSQL to 20.00)
    assert len(violations) == 1 and violations[0].startswith(f"order {order.id} is cancelled with 20")
    assert money_violations(net_charged={}) == []


def test_a_pending_order_and_an_order_whose_saga_disagrees_are_mismatches():
    a_product()
    pending, confirmed = an_order(key="a"), an_order(key="b")
    confirmed.status = OrderStatus.CONFIRMED  # its saga is still PENDING: no worker runs here
    confirmed.save()

    mismatches = order_saga_mismatches(type(pending).objects.all())

    assert len(mismatches) == 2
    assert any("still pending" in m for m in mismatches) and any("confirmed but its saga is PENDING" in m for m in mismatches)


def test_an_event_emitted_twice_for_one_order_is_reported_once_per_type():
    for _ in range(2):
        with transaction.atomic():
            outbox_emit(aggregate_type="order", aggregate_id="o-1", event_type="ORDER_CONFIRMED", payload={})
    with transaction.atomic():
        outbox_emit(aggregate_type="order", aggregate_id="o-1", event_type="ORDER_CREATED", payload={})

    repeated = outbox_repeated_events(aggregate_type="order", event_types=["ORDER_CONFIRMED", "ORDER_CREATED"])

    assert repeated == [("o-1", "ORDER_CONFIRMED", 2)]
    assert outbox_unpublished().count() == 3
    OutboxEvent.objects.update(published_at=timezone.now() - timedelta(seconds=1))
    assert outbox_unpublished().count() == 0


def test_units_that_left_stock_without_a_committed_reservation_break_the_stock_ledger():
    from inventory.selectors import stock_ledger_violations

    product = a_product(on_hand=100)
    Stock.objects.filter(product=product).update(on_hand=95)

    assert stock_ledger_violations(initial_on_hand={product.sku: 100}) == [
        f"{product.sku}: 95 on hand + 0 committed != 100 at the start"
    ]
    assert stock_ledger_violations(initial_on_hand={product.sku: 95}) == []


@pytest.mark.services(reason="reads a Redis stream")
def test_the_stream_check_sees_an_event_published_long_before_the_redis_restart_missing_from_its_stream():
    import uuid

    from perf.chaos_checks import _stream_check
    from sagas.publishers import RedisStreamPublisher
    from sagas.relay import outbox_relay

    aggregate_type = f"crate{uuid.uuid4().hex[:8]}"
    with transaction.atomic():
        events = [outbox_emit(aggregate_type=aggregate_type, aggregate_id="a", event_type=f"E{n}", payload={}) for n in range(3)]
    publisher = RedisStreamPublisher(settings.REDIS_URL)
    outbox_relay(publisher=publisher)
    OutboxEvent.objects.filter(pk=events[0].pk).update(published_at=timezone.now() - timedelta(days=1))
    [(first_entry, _), *_] = publisher.client.xrange(f"events.{aggregate_type}")
    publisher.client.xdel(f"events.{aggregate_type}", first_entry)  # lost, long after it was published

    check = _stream_check()
    publisher.client.delete(f"events.{aggregate_type}")

    assert check.checked == 3
    assert check.violations == [f"event {events[0].id} is missing from its stream"]
