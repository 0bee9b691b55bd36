"""Reads over orders: the shop's invariants and a summary of how orders ended."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping
from decimal import Decimal

from django.db.models import Sum, Value
from django.db.models.functions import Coalesce, NullIf

from inventory.models import Reservation, ReservationStatus, Stock
from orders.models import Flow, Order, OrderItem, OrderStatus
from payments.models import Payment, Refund
from sagas.models import SagaInstance, SagaState


def shop_invariant_violations(orders=None) -> list[str]:
    """Every way the shop's books disagree, as sentences (empty when all is well): the stock
    violations and the money violations below."""
    return stock_violations() + money_violations(orders)


def stock_violations() -> list[str]:
    """Stock reserved must equal what live reservations hold, within 0..on_hand."""
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
    return violations


def money_violations(orders=None, *, net_charged: Mapping[str, Decimal] | None = None) -> list[str]:
    """Per settled order, charged - refunded must equal the total if confirmed and 0 if cancelled.
    By default from our Payment and Refund rows (those of `orders` only, when given: a run's own
    check reads its orders' payments, not the whole history); pass `net_charged` (order id -> net
    amount, e.g. from the payment provider's own ledger) to check another book against the orders."""
    settled = list((Order.objects.all() if orders is None else orders).exclude(status=OrderStatus.PENDING).only("id", "status", "total"))
    if net_charged is None:
        net_charged = _net_charged(None if orders is None else [str(order.id) for order in settled])
    violations = []
    for order in settled:
        net = net_charged.get(str(order.id), Decimal("0"))
        expected = order.total if order.status == OrderStatus.CONFIRMED else Decimal("0")
        if net != expected:
            violations.append(f"order {order.id} is {order.status} with {net} charged net; expected {expected}")
    return violations


def _net_charged(references: list[str] | None) -> dict[str, Decimal]:
    """Reference -> charged - refunded by our books: of these references (through
    payment_reference_idx, a thousand at a time), or of every payment when None."""
    if references is None:
        chunks = [(Payment.objects.all(), Refund.objects.all())]
    else:
        chunks = [
            (Payment.objects.filter(reference__in=part), Refund.objects.filter(payment__reference__in=part))
            for part in (references[n : n + 1000] for n in range(0, len(references), 1000))
        ]
    net: dict[str, Decimal] = {}
    for payments, refunds in chunks:
        charged = _sums(payments.values("reference"), "reference")
        refunded = _sums(refunds.values("payment__reference"), "payment__reference")
        net.update({ref: amount - refunded.get(ref, Decimal("0")) for ref, amount in charged.items()})
    return net


def order_saga_mismatches(orders) -> list[str]:
    """Orders whose outcome disagrees with their saga (kept, or the summary of a pruned one): an
    orchestrated order is confirmed exactly when its saga COMPLETED and cancelled exactly when it
    COMPENSATED; a choreographed one has no saga. Pending orders are reported too."""
    expected = {OrderStatus.CONFIRMED: SagaState.COMPLETED, OrderStatus.CANCELLED: SagaState.COMPENSATED}
    violations = []
    rows = orders.annotate(final_state=Coalesce("saga__state", NullIf("saga_outcome", Value(""))))
    for order_id, flow, status, saga_state in rows.values_list("id", "flow", "status", "final_state"):
        if status == OrderStatus.PENDING:
            violations.append(f"order {order_id} ({flow}) is still pending (saga {saga_state or '-'})")
        elif flow == Flow.CHOREOGRAPHED and saga_state is not None:
            violations.append(f"order {order_id} is choreographed but has a saga ({saga_state})")
        elif flow == Flow.ORCHESTRATED and saga_state != expected[status]:
            violations.append(f"order {order_id} is {status} but its saga is {saga_state}")
    return violations


def order_reservation_violations(orders) -> list[str]:
    """A confirmed order's reservations are committed and hold exactly its lines; a cancelled
    order holds nothing (every reservation it made was released)."""
    orders = list(orders.exclude(status=OrderStatus.PENDING).only("id", "saga_id", "pruned_saga_id", "status"))
    lines: dict = {}
    for order_id, product_id, quantity in OrderItem.objects.filter(order__in=orders).values_list("order_id", "product_id", "quantity"):
        lines.setdefault(order_id, {})[product_id] = quantity
    held: dict = {}
    for saga_id, product_id, quantity, status in Reservation.objects.filter(
        saga_id__in=[o.correlation_id for o in orders]
    ).values_list("saga_id", "product_id", "quantity", "status"):
        held.setdefault((saga_id, status), {})[product_id] = quantity
    violations = []
    for order in orders:
        committed = held.get((order.correlation_id, ReservationStatus.COMMITTED), {})
        reserved = held.get((order.correlation_id, ReservationStatus.RESERVED), {})
        if order.status == OrderStatus.CONFIRMED and (committed != lines.get(order.id, {}) or reserved):
            violations.append(f"order {order.id} is confirmed; committed {committed}, still reserved {reserved}, ordered {lines.get(order.id)}")
        if order.status == OrderStatus.CANCELLED and (committed or reserved):
            violations.append(f"order {order.id} is cancelled but holds committed {committed}, reserved {reserved}")
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
    return dict(OrderItem.objects.filter(order_id=order_id).values_list("product_id", "quantity"))


def order_events(order_id):
    """The order's outbox events, oldest first (kept until the retention period removes them)."""
    from sagas.models import OutboxEvent

    return OutboxEvent.objects.filter(aggregate_type="order", aggregate_id=str(order_id)).order_by("sequence")


def orders_with_events(orders) -> list[Order]:
    """`orders` (a page of them, or one), each with `events`: its outbox events oldest first, read
    for all of them in one query (through outbox_aggregate_idx), not one query per order."""
    from sagas.models import OutboxEvent

    orders = list(orders)
    events = defaultdict(list)
    rows = OutboxEvent.objects.filter(aggregate_type="order", aggregate_id__in=[str(order.id) for order in orders])
    for event in rows.order_by("sequence"):
        events[event.aggregate_id].append(event)
    for order in orders:
        order.events = events[str(order.id)]
    return orders
