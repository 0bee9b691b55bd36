"""What `make bench` compares the saga engine with: the same order process written the way a team
would without chainsaga. A plain Celery chain of the same four steps calling the same services
(so the same rows are locked and written), undone by a plain `link_error`; no saga log, no
outbox, no relay. Also the physical reference: a chain of four tasks that do nothing.

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
import orders.services
import payments.services
from inventory.services import stock_release, stock_reserve
from orders.models import Order, OrderItem
from orders.selectors import order_quantities
from orders.services import order_accept, order_confirm, order_mark_cancelled
from payments.services import payment_charge, payment_refund

NOOP_DONE_KEY = "bench:noop-done"


@contextlib.contextmanager
def _without_outbox():
    """The baseline has no outbox: the services' outbox_emit does nothing inside this block.
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
    """The hand-rolled compensation: undo everything, newest first (each service is idempotent)."""
    now = timezone.now()
    with _without_outbox():
        payment_refund(idempotency_key=f"baseline:{order_id}:charge", reference=order_id, now=now)
        stock_release(saga_id=order_id, order_id=order_id, now=now)
        order_mark_cancelled(order_id=order_id, reason="baseline chain failed", now=now)


@transaction.atomic
def baseline_order_place(*, owner, products, lines, payment_method: str) -> Order:
    """The order rows order_place writes (order and items), then the chain; no saga, no outbox."""
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


@shared_task(name="bench.noop")
def noop() -> None:
    pass


@shared_task(name="bench.noop_done")
def noop_done(*, sent_at: float) -> None:
    """The last link of a no-op chain: records how long the chain took, for the reference figure."""
    redis.Redis.from_url(settings.REDIS_URL).rpush(NOOP_DONE_KEY, time.time() - sent_at)


def noop_chain_send() -> None:
    chain(noop.si(), noop.si(), noop.si(), noop_done.si(sent_at=time.time())).apply_async()
