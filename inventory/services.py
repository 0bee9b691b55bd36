"""Stock reservations. Each function is idempotent per saga and takes stock rows in id order."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from uuid import UUID

from django.db import transaction
from django.db.models import F

from inventory.locks import lock_stocks
from inventory.models import SETTLED_RESERVATIONS, Product, Reservation, ReservationStatus, Stock
from sagas import BusinessError
from sagas.outbox import outbox_emit
from sagas.retention import PruneRun, oldest_batch, prune_in_batches


class OutOfStock(BusinessError):
    """Not enough units available for a reservation. Never retried: the order is cancelled."""

    def __init__(self, shortages: Mapping[str, tuple[int, int]]):
        self.shortages = dict(shortages)
        detail = ", ".join(f"{sku}: wanted {want}, available {have}" for sku, (want, have) in self.shortages.items())
        super().__init__(f"out of stock ({detail})")


@transaction.atomic
def stock_reserve(
    *, saga_id: UUID, order_id: UUID | str, quantities: Mapping[int, int], now: datetime, flow: str = "orchestrated"
) -> list[Reservation]:
    """Hold `quantities` (product id -> units) for the saga, all or nothing. A second call for the
    same saga returns the first call's reservations. Raises OutOfStock."""
    existing = list(Reservation.objects.filter(saga_id=saga_id))
    if existing:
        return existing
    stocks = lock_stocks(quantities)
    shortages = {}
    for product_id, quantity in quantities.items():
        stock = stocks.get(product_id)
        available = stock.available if stock else 0
        if quantity > available:
            shortages[Product.objects.get(pk=product_id).sku] = (quantity, available)
    if shortages:
        raise OutOfStock(shortages)
    reservations = []
    for product_id, quantity in sorted(quantities.items()):
        Stock.objects.filter(pk=product_id).update(reserved=F("reserved") + quantity)
        reservations.append(
            Reservation.objects.create(saga_id=saga_id, product_id=product_id, quantity=quantity, created_at=now, updated_at=now)
        )
    outbox_emit(
        aggregate_type="order",
        aggregate_id=order_id,
        event_type="INVENTORY_RESERVED",
        payload={"order_id": str(order_id), "items": {str(p): q for p, q in quantities.items()}, "flow": flow},
        now=now,
    )
    return reservations


@transaction.atomic
def stock_release(*, saga_id: UUID, order_id: UUID | str, now: datetime) -> int:
    """Give back the units the saga holds. A no-op when nothing is held (never reserved, or
    released already). Returns how many reservations it released."""
    held = {r.product_id: r for r in Reservation.objects.filter(saga_id=saga_id, status=ReservationStatus.RESERVED)}
    if not held:
        return 0
    lock_stocks(held)
    for product_id, reservation in sorted(held.items()):
        Stock.objects.filter(pk=product_id).update(reserved=F("reserved") - reservation.quantity)
    Reservation.objects.filter(pk__in=[r.pk for r in held.values()]).update(status=ReservationStatus.RELEASED, updated_at=now)
    outbox_emit(
        aggregate_type="order",
        aggregate_id=order_id,
        event_type="INVENTORY_RELEASED",
        payload={"order_id": str(order_id), "items": {str(p): r.quantity for p, r in held.items()}},
        now=now,
    )
    return len(held)


@transaction.atomic
def stock_commit(*, saga_id: UUID, now: datetime) -> int:
    """The reserved units leave the warehouse: on hand and reserved both drop. Idempotent."""
    held = {r.product_id: r for r in Reservation.objects.filter(saga_id=saga_id, status=ReservationStatus.RESERVED)}
    if not held:
        return 0
    lock_stocks(held)
    for product_id, reservation in sorted(held.items()):
        Stock.objects.filter(pk=product_id).update(
            reserved=F("reserved") - reservation.quantity, on_hand=F("on_hand") - reservation.quantity
        )
    Reservation.objects.filter(pk__in=[r.pk for r in held.values()]).update(status=ReservationStatus.COMMITTED, updated_at=now)
    return len(held)


@transaction.atomic
def product_create(*, sku: str, name: str, price, currency: str = "EUR", on_hand: int = 0) -> Product:
    """A product with its stock row. Returns the existing product when the sku exists."""
    product, created = Product.objects.get_or_create(sku=sku, defaults={"name": name, "price": price, "currency": currency})
    if created:
        Stock.objects.create(product=product, on_hand=on_hand)
    return product


def reservations_prune(*, now: datetime, retention: timedelta, batch_size: int | None = None, time_budget: float | None = None) -> PruneRun:
    """Delete reservations settled (released, or committed when their units left) longer than
    `retention` ago, oldest first, in small batches (sagas.retention); held ones never."""
    expired = Reservation.objects.filter(status__in=SETTLED_RESERVATIONS, updated_at__lt=now - retention)

    def delete_batch(size: int) -> int:
        with transaction.atomic():
            ids = oldest_batch(expired, order_by="updated_at", size=size)
            Reservation.objects.filter(pk__in=ids).delete()
        return len(ids)

    return prune_in_batches(delete_batch, batch_size=batch_size, time_budget=time_budget)
