"""Reads over orders: the shop's invariants and a summary of how orders ended."""

from __future__ import annotations

import statistics
from collections import Counter
from decimal import Decimal

from django.db.models import Sum

from inventory.models import Reservation, ReservationStatus, Stock
from orders.models import Order, OrderStatus
from payments.models import Payment, Refund
from sagas.models import SagaInstance


def shop_invariant_violations(orders=None) -> list[str]:
    """Every way the shop's books disagree, as sentences (empty when all is well):
    stock reserved must equal what live reservations hold, within 0..on_hand; per settled order,
    charged - refunded must equal the total if confirmed and 0 if cancelled."""
    violations = []
    held = dict(
        Reservation.objects.filter(status=ReservationStatus.RESERVED)
        .values("product_id")
        .annotate(units=Sum("quantity"))
        .values_list("product_id", "units")
    )
    for stock in Stock.objects.select_related("product"):
        if stock.reserved != held.get(stock.product_id, 0):
            violations.append(f"{stock.product.sku}: reserved {stock.reserved} but reservations hold {held.get(stock.product_id, 0)}")
        if not 0 <= stock.reserved <= stock.on_hand:
            violations.append(f"{stock.product.sku}: reserved {stock.reserved} outside 0..{stock.on_hand}")
    charged = _sums(Payment.objects.values("reference"), "reference")
    refunded = _sums(Refund.objects.values("payment__reference"), "payment__reference")
    orders = Order.objects.all() if orders is None else orders
    for order in orders.exclude(status=OrderStatus.PENDING).only("id", "status", "total"):
        net = charged.get(str(order.id), Decimal("0")) - refunded.get(str(order.id), Decimal("0"))
        expected = order.total if order.status == OrderStatus.CONFIRMED else Decimal("0")
        if net != expected:
            violations.append(f"order {order.id} is {order.status} with {net} charged net; expected {expected}")
    return violations


def order_outcomes(order_ids) -> dict:
    """How these orders ended: counts by order status and saga state, and how long each took from
    placed to settled (confirmed or cancelled), in seconds; both flows alike."""
    orders = Order.objects.filter(pk__in=order_ids)
    sagas = SagaInstance.objects.filter(order__in=orders)
    durations = sorted(
        (o.updated_at - o.created_at).total_seconds()
        for o in orders.exclude(status=OrderStatus.PENDING).only("created_at", "updated_at")
    )
    return {
        "orders": Counter(orders.values_list("status", flat=True)),
        "sagas": Counter(sagas.values_list("state", flat=True)),
        "median_s": statistics.median(durations) if durations else None,
        "p95_s": durations[max(0, int(round(0.95 * len(durations))) - 1)] if durations else None,
    }


def _sums(queryset, field: str) -> dict[str, Decimal]:
    return dict(queryset.annotate(total=Sum("amount")).values_list(field, "total"))


def order_quantities(order_id) -> dict[int, int]:
    """Product id -> units ordered."""
    from orders.models import OrderItem

    return dict(OrderItem.objects.filter(order_id=order_id).values_list("product_id", "quantity"))


def order_events(order_id):
    """The order's outbox events, oldest first (kept until the retention period removes them)."""
    from sagas.models import OutboxEvent

    return OutboxEvent.objects.filter(aggregate_type="order", aggregate_id=str(order_id)).order_by("sequence")
