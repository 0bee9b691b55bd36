"""What `make bench` compares the saga engine with: the same order process written the way a team
would without chainsaga. Three references, from the fairest to the barest:

- The fair baseline (`fair_order_place`, tasks `bench.fair.*`): what a careful team writes to get
  the guarantees chainsaga ships, with a plain Celery chain of the same four steps. Placement is
  `orders.services.order_place` itself (idempotency record, validation, order rows, ORDER_CREATED
  in the same transaction) with only the saga start replaced by sending the chain on commit. Each
  step calls the same service as the saga's step, so the same rows are locked and written and the
  same outbox events are emitted in the same transactions. Each step is idempotent from the
  business rows (the order's status, the saga's reservations, the payment by its idempotency
  key), acks late, retries transient errors with backoff and jitter and never a business refusal.
  Every step carries a `link_error` to `bench.fair.undo`, a bind=True task: Celery sends it
  through the broker with the failed task's id first (DESIGN.md rule 4), and it undoes newest
  first what the business rows show done: refund (and settle a charge whose answer was lost),
  release the stock, cancel the order. What it does without: the saga log, the step rows and
  delivery counts, the sweeper, versions; so it cannot tell what is in flight or re-drive a lost
  message.
- The naive chain (`naive_order_place`, tasks `bench.accept` ...): today's plain chain. Placement
  writes only the order and its items (no idempotency record, no validation), the steps call the
  same services with their outbox events switched off, and the compensation is called inline in
  the failing worker (its errback takes `*args`, so Celery calls it there and swallows what it
  raises).
- The no-op chain (`noop_chain_send`): four tasks that do nothing, the broker's and Celery's own
  cost.

Loaded into a worker with `celery worker --include perf.baseline`.
"""

from __future__ import annotations

import contextlib
import time

import redis
from celery import chain, shared_task
from django.conf import settings
from django.db import transaction
from django.utils import timezone

import inventory.services
import orders.sagas
import orders.services
import payments.services
from inventory.services import OutOfStock, stock_release, stock_reserve
from orders.models import Flow, Order, OrderItem, OrderStatus
from orders.sagas import STEP_FAILED_TEXT
from orders.selectors import order_quantities
from orders.services import OrderNotPending, PlaceResult, order_accept, order_confirm, order_mark_cancelled, order_place
from payments.gateway import PaymentFailed
from payments.services import payment_charge, payment_refund
from sagas import BusinessError
from sagas.outbox import outbox_emit

NOOP_DONE_KEY = "bench:noop-done"
ROUND_START_KEY = "bench:round-start"

# --- the fair baseline ------------------------------------------------------------------------------

# What a careful team declares on each step: the message is acked once the task is done (a worker
# killed mid-task leaves it to be redelivered), an unexpected error is retried with exponential
# backoff and jitter (five tries, as the saga's payment step), a business refusal never.
CAREFUL_STEP = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": (Exception,),
    "dont_autoretry_for": (BusinessError,),
    "retry_backoff": 1,
    "retry_backoff_max": 5,
    "retry_jitter": True,
    "max_retries": 4,
}
# An undo must finish: more tries, and nothing is a business refusal there.
CAREFUL_UNDO = {**CAREFUL_STEP, "dont_autoretry_for": (), "retry_backoff_max": 30, "max_retries": 20}


def fair_charge_key(order_id: str) -> str:
    """The payment's idempotency key: stable across redeliveries and retries of the step."""
    return f"order:{order_id}:charge"


def _order_for_step(order_id: str) -> Order:
    """Lock the order for the step's transaction (so a step and the undo never interleave); a
    cancelled order was undone already, and a late or duplicated step must not act on it."""
    order = Order.objects.select_for_update().get(pk=order_id)
    if order.status == OrderStatus.CANCELLED:
        raise OrderNotPending(f"order {order.id} is {order.status}")
    return order


def _failure_event(order_id: str, event_type: str, error: BaseException) -> None:
    """What the saga's on_failure hooks emit on a business refusal, in a transaction of its own
    (the step's rolled back)."""
    with transaction.atomic():
        payload = {"order_id": order_id, "reason": str(error), "flow": "orchestrated"}
        outbox_emit(aggregate_type="order", aggregate_id=order_id, event_type=event_type, payload=payload)


@shared_task(name="bench.fair.accept", **CAREFUL_STEP)
def fair_accept(*, order_id: str) -> None:
    # Locks the order and checks it is pending; nothing to write, so a redelivery just checks again.
    order_accept(order_id=order_id)


@shared_task(name="bench.fair.reserve", **CAREFUL_STEP)
def fair_reserve(*, order_id: str) -> None:
    try:
        with transaction.atomic():
            order = _order_for_step(order_id)
            # Already reserved for this order? stock_reserve returns those reservations.
            stock_reserve(saga_id=order.correlation_id, order_id=order_id, quantities=order_quantities(order_id), now=timezone.now())
    except OutOfStock as exc:
        _failure_event(order_id, "STOCK_UNAVAILABLE", exc)
        raise


@shared_task(name="bench.fair.charge", **CAREFUL_STEP)
def fair_charge(*, order_id: str) -> None:
    try:
        with transaction.atomic():
            order = _order_for_step(order_id)
            # Already charged under this key? payment_charge returns that payment.
            payment_charge(
                idempotency_key=fair_charge_key(order_id),
                reference=order_id,
                amount=order.total,
                currency=order.currency,
                method=order.payment_method,
                now=timezone.now(),
            )
    except PaymentFailed as exc:
        _failure_event(order_id, "PAYMENT_FAILED", exc)
        raise


@shared_task(name="bench.fair.confirm", **CAREFUL_STEP)
def fair_confirm(*, order_id: str) -> None:
    # Already confirmed? order_confirm returns; cancelled meanwhile? it refuses.
    order_confirm(order_id=order_id, now=timezone.now())


# The saga's step names, so the undo tells the customer what the saga would.
FAIR_STEPS = (
    ("create_order", fair_accept),
    ("reserve_inventory", fair_reserve),
    ("process_payment", fair_charge),
    ("notify_fulfillment", fair_confirm),
)


@shared_task(bind=True, name="bench.fair.undo", **CAREFUL_UNDO)
def fair_undo(self, failed_task_id: str, *, order_id: str, step: str) -> None:
    """The link_error of every step: bind=True makes Celery send it through the broker with the
    failed task's id first, instead of calling it inline in the failing worker. Undoes, newest
    first and in one transaction holding the order's lock, what the business rows show done: the
    charge (a charge whose answer was lost, when the payment step failed, is found by its key
    and refunded too), the reservations, the order. A confirmed order, or one undone already, is
    left alone: the failure was a late duplicate."""
    now = timezone.now()
    with transaction.atomic():
        order = Order.objects.select_for_update().get(pk=order_id)
        if order.status != OrderStatus.PENDING:
            return
        uncertain = order_id if step == "process_payment" else None
        payment_refund(idempotency_key=fair_charge_key(order_id), reference=uncertain, now=now)
        stock_release(saga_id=order.correlation_id, order_id=order_id, now=now)
        order_mark_cancelled(order_id=order_id, reason=STEP_FAILED_TEXT[step], now=now)


def fair_chain(order_id: str):
    """The four steps as one Celery chain, each with the queued undo as its link_error."""
    return chain(
        *(task.si(order_id=order_id).set(link_error=fair_undo.s(order_id=order_id, step=name)) for name, task in FAIR_STEPS)
    )


class _SendChainOnCommit:
    """Stands in for orders.sagas.place_order inside fair_order_place: where order_place records
    a saga in the order's transaction (its first step sent on commit), send the chain on commit."""

    def start(self, *, input, idempotency_key=None):
        order_id = input["order_id"]
        transaction.on_commit(lambda: fair_chain(order_id).apply_async())
        return None  # no saga: the order's saga stays empty


def fair_order_place(**kwargs) -> PlaceResult:
    """`order_place(flow=orchestrated, **kwargs)` itself, with the saga start replaced by sending
    the fair chain on commit. For the benchmark's placing process only: it swaps a module
    attribute for the duration of the call, which is not thread-safe."""
    saved = orders.sagas.place_order
    orders.sagas.place_order = _SendChainOnCommit()
    try:
        return order_place(flow=Flow.ORCHESTRATED, **kwargs)
    finally:
        orders.sagas.place_order = saved


# --- the naive chain --------------------------------------------------------------------------------


@contextlib.contextmanager
def _without_outbox():
    """The naive chain has no outbox: the services' outbox_emit does nothing inside this block.
    Safe in a prefork child, which runs one task at a time."""
    modules = (inventory.services, orders.services, payments.services)
    saved = [module.outbox_emit for module in modules]
    for module in modules:
        module.outbox_emit = lambda **kwargs: None
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.outbox_emit = original


@shared_task(name="bench.accept")
def accept(*, order_id: str) -> None:
    order_accept(order_id=order_id)


@shared_task(name="bench.reserve")
def reserve(*, order_id: str) -> None:
    with _without_outbox():
        stock_reserve(saga_id=order_id, order_id=order_id, quantities=order_quantities(order_id), now=timezone.now())


@shared_task(name="bench.charge")
def charge(*, order_id: str) -> None:
    order = Order.objects.get(pk=order_id)
    with _without_outbox():
        payment_charge(
            idempotency_key=f"baseline:{order_id}:charge",
            reference=order_id,
            amount=order.total,
            currency=order.currency,
            method=order.payment_method,
            now=timezone.now(),
        )


@shared_task(name="bench.confirm")
def confirm(*, order_id: str) -> None:
    with _without_outbox():
        order_confirm(order_id=order_id, now=timezone.now())


@shared_task(name="bench.undo")
def undo(*args, order_id: str) -> None:
    """The naive compensation: undo everything, newest first (each service is idempotent). Its
    `*args` make Celery call it inline in the failing worker, not through the broker."""
    now = timezone.now()
    with _without_outbox():
        payment_refund(idempotency_key=f"baseline:{order_id}:charge", reference=order_id, now=now)
        stock_release(saga_id=order_id, order_id=order_id, now=now)
        order_mark_cancelled(order_id=order_id, reason="baseline chain failed", now=now)


@transaction.atomic
def naive_order_place(*, owner, products, lines, payment_method: str) -> Order:
    """The order rows order_place writes (order and items), then the chain; no idempotency
    record, no validation, no saga, no outbox."""
    now = timezone.now()
    total = sum(products[sku].price * quantity for sku, quantity in lines)
    order = Order.objects.create(owner=owner, total=total, currency="EUR", payment_method=payment_method, created_at=now, updated_at=now)
    OrderItem.objects.bulk_create(
        OrderItem(order=order, product=products[sku], sku=sku, quantity=quantity, unit_price=products[sku].price) for sku, quantity in lines
    )
    order_id = str(order.id)
    steps = [task.si(order_id=order_id).set(link_error=undo.si(order_id=order_id)) for task in (accept, reserve, charge, confirm)]
    transaction.on_commit(lambda: chain(*steps).apply_async())
    return order


# --- timing ----------------------------------------------------------------------------------------


@shared_task(name="bench.round_start")
def round_start() -> None:
    """Queued ahead of a round's placement, so it is the first message the worker takes when it
    consumes again: records when that was (wall clock), where the round's timed window starts."""
    redis.Redis.from_url(settings.REDIS_URL).rpush(ROUND_START_KEY, time.time())


# --- the no-op chain --------------------------------------------------------------------------------


@shared_task(name="bench.noop")
def noop() -> None:
    pass


@shared_task(name="bench.noop_done")
def noop_done() -> None:
    """The last link of a no-op chain: records when the chain finished (wall clock)."""
    redis.Redis.from_url(settings.REDIS_URL).rpush(NOOP_DONE_KEY, time.time())


def noop_chain_send() -> None:
    chain(noop.si(), noop.si(), noop.si(), noop_done.si()).apply_async()
