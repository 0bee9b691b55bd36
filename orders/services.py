"""Placing, accepting, confirming and cancelling orders. The saga's steps call these."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from uuid import UUID

from django.db import IntegrityError, transaction
from django.db.models import F, OuterRef, Subquery
from django.utils import timezone

from inventory.models import Product
from inventory.services import stock_commit
from orders.locks import lock_customer
from orders.models import Flow, IdempotencyRecord, IdempotencyRecordState, Order, OrderItem, OrderStatus
from sagas import BusinessError
from sagas.exceptions import SagaStateConflict
from sagas.models import SagaInstance, SagaState
from sagas.outbox import outbox_emit
from sagas.retention import PruneRun, oldest_batch, prune_in_batches
from sagas.services import saga_abort

SUPPORTED_FLOWS = (Flow.ORCHESTRATED, Flow.CHOREOGRAPHED)

CANCELLED_BY_CUSTOMER = "cancelled by the customer"

# A request that claimed a key and then vanished (process killed) stops blocking the key after this.
IN_FLIGHT_EXPIRY = timedelta(seconds=60)


class OrderError(Exception):
    """Base of the errors placing or changing an order raises for the caller to report."""


class UnknownProducts(OrderError):
    def __init__(self, skus: Sequence[str]):
        self.skus = list(skus)
        super().__init__(f"unknown sku: {', '.join(self.skus)}")


class MixedCurrencies(OrderError):
    pass


class UnsupportedFlow(OrderError):
    pass


class OrderTooLarge(OrderError):
    """The total does not fit the money columns (Order.total, Payment.amount)."""


class IdempotencyKeyReused(OrderError):
    """The key was used before with a different request body."""


class IdempotencyKeyInFlight(OrderError):
    """A request with this key is still being processed."""


class OrderNotCancellable(OrderError):
    pass


class TooManyPendingOrders(OrderError):
    """The customer already has as many pending orders as one may have at once."""


class OrderNotPending(BusinessError):
    """A saga step found its order no longer pending."""


@dataclass(frozen=True)
class LineRequest:
    sku: str
    quantity: int


@dataclass(frozen=True)
class PlaceResult:
    order: Order
    replayed: bool


def order_place(
    *,
    owner,
    lines: Sequence[LineRequest],
    payment_method: str,
    flow: str = Flow.ORCHESTRATED,
    idempotency_key: str,
    max_pending: int | None = None,
    now: datetime | None = None,
) -> PlaceResult:
    """Create a pending order priced from the catalogue and start its saga, once per
    (owner, idempotency_key). The same key with the same request returns the first order
    (replayed=True). With `max_pending`, an owner who has that many pending orders already is
    refused (a customer whose payments hang cannot hold the whole stock). Raises
    IdempotencyKeyReused, IdempotencyKeyInFlight, UnknownProducts, MixedCurrencies, OrderTooLarge,
    UnsupportedFlow, TooManyPendingOrders."""
    now = now or timezone.now()
    if flow not in SUPPORTED_FLOWS:
        raise UnsupportedFlow(f"flow {flow!r} is not available yet; use one of {', '.join(SUPPORTED_FLOWS)}")
    fingerprint = _fingerprint(lines, payment_method, flow)
    record, replay = _claim_key(owner=owner, key=idempotency_key, fingerprint=fingerprint, now=now)
    if replay is not None:
        return PlaceResult(replay, replayed=True)
    try:
        order = _order_create(
            owner=owner, lines=lines, payment_method=payment_method, flow=flow, record=record, max_pending=max_pending, now=now
        )
    except BaseException:
        IdempotencyRecord.objects.filter(pk=record.pk, state=IdempotencyRecordState.IN_FLIGHT).delete()
        raise
    return PlaceResult(order, replayed=False)


def _claim_key(*, owner, key: str, fingerprint: str, now: datetime) -> tuple[IdempotencyRecord, Order | None]:
    """Commit an in-flight claim on the key before any work, so a concurrent duplicate sees it."""
    try:
        with transaction.atomic():
            return IdempotencyRecord.objects.create(owner=owner, key=key, fingerprint=fingerprint, created_at=now), None
    except IntegrityError:
        pass
    with transaction.atomic():
        record = IdempotencyRecord.objects.select_for_update().get(owner=owner, key=key)
        if record.fingerprint != fingerprint:
            raise IdempotencyKeyReused(f"Idempotency-Key {key!r} was already used with a different request")
        if record.state == IdempotencyRecordState.DONE:
            return record, record.order
        if record.created_at > now - IN_FLIGHT_EXPIRY:
            raise IdempotencyKeyInFlight(f"a request with Idempotency-Key {key!r} is still in progress")
        record.created_at = now  # the first request died; this one takes the key over
        record.save(update_fields=["created_at"])
        return record, None


@transaction.atomic
def _order_create(
    *, owner, lines: Sequence[LineRequest], payment_method: str, flow: str, record: IdempotencyRecord, max_pending: int | None, now: datetime
) -> Order:
    from orders.sagas import place_order  # the definition imports this module's step functions

    if max_pending is not None:
        lock_customer(owner)  # two concurrent placements must not both pass the count
        pending = Order.objects.filter(owner=owner, status=OrderStatus.PENDING).count()
        if pending >= max_pending:
            raise TooManyPendingOrders(
                f"you have {pending} orders in progress, the most one customer may have at once ({max_pending}); "
                "place this order once one of them is confirmed or cancelled"
            )

    products = {p.sku: p for p in Product.objects.filter(sku__in=[line.sku for line in lines])}
    unknown = [line.sku for line in lines if line.sku not in products]
    if unknown:
        raise UnknownProducts(unknown)
    currencies = {products[line.sku].currency for line in lines}
    if len(currencies) != 1:
        raise MixedCurrencies(f"all items must share one currency, got {', '.join(sorted(currencies))}")
    total = sum((products[line.sku].price * line.quantity for line in lines), Decimal("0.00"))
    total_field = Order._meta.get_field("total")
    if total >= Decimal(10) ** (total_field.max_digits - total_field.decimal_places):
        raise OrderTooLarge(f"the order total {total} is more than one order may come to")
    order_id = uuid.uuid4()
    saga = None
    if flow == Flow.ORCHESTRATED:
        saga = place_order.start(input={"order_id": str(order_id)}, idempotency_key=f"order:{order_id}")
    # Choreographed: no orchestrator; payments reacts to ORDER_CREATED (orders/consumers.py et al.).
    order = Order.objects.create(
        id=order_id,
        saga=saga,
        owner=owner,
        total=total,
        currency=currencies.pop(),
        payment_method=payment_method,
        flow=flow,
        created_at=now,
        updated_at=now,
    )
    OrderItem.objects.bulk_create(
        OrderItem(order=order, product=products[line.sku], sku=line.sku, quantity=line.quantity, unit_price=products[line.sku].price)
        for line in lines
    )
    outbox_emit(
        aggregate_type="order",
        aggregate_id=order.id,
        event_type="ORDER_CREATED",
        payload={
            "order_id": str(order.id),
            "owner_id": owner.pk,
            "total": order.total,
            "currency": order.currency,
            "payment_method": payment_method,
            "flow": flow,
            "items": [{"sku": line.sku, "quantity": line.quantity} for line in lines],
        },
        now=now,
    )
    record.state, record.order = IdempotencyRecordState.DONE, order
    record.save(update_fields=["state", "order"])
    return order


@transaction.atomic
def order_accept(*, order_id: UUID | str) -> Order:
    """The saga's first step: the order exists and is still pending. Raises OrderNotPending."""
    order = Order.objects.select_for_update().get(pk=order_id)
    if order.status != OrderStatus.PENDING:
        raise OrderNotPending(f"order {order.id} is {order.status}")
    return order


@transaction.atomic
def order_confirm(*, order_id: UUID | str, now: datetime) -> Order:
    """Confirm the order, take its units out of stock and ask for fulfillment. Idempotent."""
    order = Order.objects.select_for_update().get(pk=order_id)
    if order.status == OrderStatus.CONFIRMED:
        return order
    if order.status != OrderStatus.PENDING:
        raise OrderNotPending(f"order {order.id} is {order.status}")
    stock_commit(saga_id=order.correlation_id, now=now)
    order.status, order.updated_at = OrderStatus.CONFIRMED, now
    order.save(update_fields=["status", "updated_at"])
    payload = {"order_id": str(order.id), "total": order.total, "currency": order.currency}
    outbox_emit(aggregate_type="order", aggregate_id=order.id, event_type="ORDER_CONFIRMED", payload=payload, now=now)
    outbox_emit(aggregate_type="order", aggregate_id=order.id, event_type="FULFILLMENT_REQUESTED", payload=payload, now=now)
    return order


@transaction.atomic
def order_mark_cancelled(*, order_id: UUID | str, reason: str, now: datetime) -> Order:
    """The compensation of the saga's first step. Idempotent; a confirmed order is left alone."""
    order = Order.objects.select_for_update().get(pk=order_id)
    if order.status != OrderStatus.PENDING:
        return order
    order.status, order.cancel_reason, order.updated_at = OrderStatus.CANCELLED, reason[:2000], now
    order.save(update_fields=["status", "cancel_reason", "updated_at"])
    outbox_emit(
        aggregate_type="order",
        aggregate_id=order.id,
        event_type="ORDER_CANCELLED",
        payload={"order_id": str(order.id), "reason": order.cancel_reason, "flow": order.flow},
        now=now,
    )
    return order


@transaction.atomic
def order_cancel(*, order: Order, now: datetime | None = None) -> Order:
    """Ask for a pending order to be cancelled: its saga is aborted and compensates. Returns the
    order (still pending while compensation runs; cancelled at once when the saga had nothing to
    undo). Raises OrderNotCancellable."""
    if order.status == OrderStatus.CANCELLED:
        return order
    if order.status == OrderStatus.CONFIRMED:
        raise OrderNotCancellable(f"order {order.id} is confirmed and can no longer be cancelled")
    if order.flow == Flow.CHOREOGRAPHED:
        # No orchestrator owns a choreographed order: payments and inventory may be acting on it
        # right now, and nothing could undo a reservation made after the cancel.
        raise OrderNotCancellable(f"order {order.id} is choreographed; it cannot be cancelled while its services react to it")
    try:
        saga_abort(saga_id=order.saga_id, reason=CANCELLED_BY_CUSTOMER, now=now)
    except SagaStateConflict:
        raise OrderNotCancellable(_why_not_cancellable(order)) from None
    order.refresh_from_db()
    return order


def _why_not_cancellable(order: Order) -> str:
    """What the customer is told when the order's saga refused the abort (without engine internals)."""
    state = SagaInstance.objects.values_list("state", flat=True).get(pk=order.saga_id)
    if state == SagaState.COMPLETED:
        return f"order {order.id} was confirmed meanwhile and can no longer be cancelled"
    if state == SagaState.FAILED:
        return f"order {order.id} is being undone and waits for an operator of our support team; it cannot be cancelled now"
    return f"order {order.id} cannot be cancelled right now; our support team has been notified"


def order_keep_saga_summary(*, saga_ids: Sequence[UUID]) -> int:
    """Before these sagas are pruned (sagas.retention.saga_pruning), their orders keep a summary:
    the saga's id, final state, finish time and failure reason; the link to the saga is emptied.
    One statement, in the pruning transaction. Returns how many orders."""
    saga = SagaInstance.objects.filter(pk=OuterRef("saga_id"))
    return Order.objects.filter(saga_id__in=saga_ids).update(
        pruned_saga_id=F("saga_id"),
        saga_outcome=Subquery(saga.values("state")),
        saga_finished_at=Subquery(saga.values("finished_at")),
        saga_failure_reason=Subquery(saga.values("failure_reason")),
        saga=None,
    )


def idempotency_records_prune(*, now: datetime, retention: timedelta, batch_size: int | None = None, time_budget: float | None = None) -> PruneRun:
    """Forget Idempotency-Keys used longer than `retention` ago, oldest first, in small batches
    (sagas.retention): the same key then places a new order. The orders stay."""
    expired = IdempotencyRecord.objects.filter(created_at__lt=now - retention)

    def delete_batch(size: int) -> int:
        with transaction.atomic():
            ids = oldest_batch(expired, order_by="created_at", size=size)
            IdempotencyRecord.objects.filter(pk__in=ids).delete()
        return len(ids)

    return prune_in_batches(delete_batch, batch_size=batch_size, time_budget=time_budget)


def _fingerprint(lines: Sequence[LineRequest], payment_method: str, flow: str) -> str:
    canonical = json.dumps(
        {"items": sorted([line.sku, line.quantity] for line in lines), "payment_method": payment_method, "flow": flow},
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
