"""Stock reservations under concurrency, and their idempotency per saga."""

import threading
import uuid

import pytest
from django.db import connection
from django.utils import timezone

from inventory.models import Reservation, ReservationStatus, Stock
from inventory.services import OutOfStock, stock_release, stock_reserve
from tests.orders_helpers import a_product

BUYERS = 50


@pytest.mark.services(reason="needs PostgreSQL row locks for real concurrency")
@pytest.mark.django_db(transaction=True)
def test_fifty_concurrent_orders_for_the_last_ten_units_give_exactly_ten_reservations():
    product = a_product(on_hand=10)
    start = threading.Barrier(BUYERS)
    outcomes: list[str] = []
    lock = threading.Lock()

    def buy_one():
        try:
            start.wait(timeout=30)
            stock_reserve(saga_id=uuid.uuid4(), order_id=uuid.uuid4(), quantities={product.pk: 1}, now=timezone.now())
            outcome = "reserved"
        except OutOfStock:
            outcome = "out of stock"
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below, not lost in a thread
            outcome = f"error: {type(exc).__name__}: {exc}"
        finally:
            connection.close()
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=buy_one) for _ in range(BUYERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert sorted(set(outcomes)) == ["out of stock", "reserved"], outcomes
    assert outcomes.count("reserved") == 10
    assert outcomes.count("out of stock") == 40
    stock = Stock.objects.get(pk=product.pk)
    assert (stock.on_hand, stock.reserved) == (10, 10)
    assert Reservation.objects.filter(product=product, status=ReservationStatus.RESERVED).count() == 10


@pytest.mark.django_db
def test_reserving_twice_for_the_same_saga_holds_the_units_once():
    product = a_product(on_hand=10)
    saga_id, order_id, now = uuid.uuid4(), uuid.uuid4(), timezone.now()
    first = stock_reserve(saga_id=saga_id, order_id=order_id, quantities={product.pk: 4}, now=now)

    again = stock_reserve(saga_id=saga_id, order_id=order_id, quantities={product.pk: 4}, now=now)

    assert [r.pk for r in again] == [r.pk for r in first]
    assert Stock.objects.get(pk=product.pk).reserved == 4
    assert Reservation.objects.count() == 1


@pytest.mark.django_db
def test_a_reservation_that_does_not_fit_holds_nothing_at_all():
    plenty, scarce = a_product("PLENTY", on_hand=10), a_product("SCARCE", on_hand=1)

    with pytest.raises(OutOfStock) as refused:
        stock_reserve(
            saga_id=uuid.uuid4(), order_id=uuid.uuid4(), quantities={plenty.pk: 2, scarce.pk: 2}, now=timezone.now()
        )

    assert refused.value.shortages == {"SCARCE": (2, 1)}
    assert list(Stock.objects.order_by("pk").values_list("reserved", flat=True)) == [0, 0]
    assert not Reservation.objects.exists()


@pytest.mark.django_db
def test_releasing_when_nothing_is_held_is_a_no_op():
    product = a_product(on_hand=10)
    stock_reserve(saga_id=uuid.uuid4(), order_id=uuid.uuid4(), quantities={product.pk: 3}, now=timezone.now())

    released = stock_release(saga_id=uuid.uuid4(), order_id=uuid.uuid4(), now=timezone.now())

    assert released == 0
    assert Stock.objects.get(pk=product.pk).reserved == 3


@pytest.mark.django_db
def test_releasing_twice_gives_the_units_back_once():
    product = a_product(on_hand=10)
    saga_id, order_id = uuid.uuid4(), uuid.uuid4()
    stock_reserve(saga_id=saga_id, order_id=order_id, quantities={product.pk: 3}, now=timezone.now())

    first = stock_release(saga_id=saga_id, order_id=order_id, now=timezone.now())
    second = stock_release(saga_id=saga_id, order_id=order_id, now=timezone.now())

    assert (first, second) == (1, 0)
    assert Stock.objects.get(pk=product.pk).reserved == 0
    assert Reservation.objects.get().status == ReservationStatus.RELEASED
