"""The place-order saga, orchestrated: each step is one service call, undone newest-first."""

from sagas import Retry, Saga, Step, StepContext
from sagas.models import SagaState
from sagas.outbox import outbox_emit

from inventory.services import OutOfStock, stock_release, stock_reserve
from orders.models import Order
from orders.selectors import order_quantities
from orders.services import order_accept, order_confirm, order_mark_cancelled
from payments.gateway import PaymentFailed
from payments.services import payment_charge, payment_refund


def create_order(ctx: StepContext) -> dict:
    order = order_accept(order_id=ctx.input["order_id"])
    return {"order_id": str(order.id), "total": order.total}


def cancel_order(ctx: StepContext) -> None:
    order_mark_cancelled(order_id=ctx.input["order_id"], reason=_why(ctx), now=ctx.now)


def reserve_inventory(ctx: StepContext) -> dict:
    order_id = ctx.input["order_id"]
    reservations = stock_reserve(saga_id=ctx.saga_id, order_id=order_id, quantities=order_quantities(order_id), now=ctx.now)
    return {"reservations": [r.pk for r in reservations]}


def release_inventory(ctx: StepContext) -> None:
    stock_release(saga_id=ctx.saga_id, order_id=ctx.input["order_id"], now=ctx.now)


def process_payment(ctx: StepContext) -> dict:
    order = Order.objects.get(pk=ctx.input["order_id"])
    payment = payment_charge(
        idempotency_key=ctx.idempotency_key,
        reference=str(order.id),
        amount=order.total,
        currency=order.currency,
        method=order.payment_method,
        now=ctx.now,
    )
    return {"payment": payment.provider_reference, "amount": payment.amount}


def payment_failed(ctx: StepContext, error: BaseException) -> None:
    # Only a refusal: after exhausted transient errors the provider may well have charged.
    if isinstance(error, PaymentFailed):
        _failure_event(ctx, "PAYMENT_FAILED", error)


def stock_unavailable(ctx: StepContext, error: BaseException) -> None:
    if isinstance(error, OutOfStock):
        _failure_event(ctx, "STOCK_UNAVAILABLE", error)


def _failure_event(ctx: StepContext, event_type: str, error: BaseException) -> None:
    order_id = ctx.input["order_id"]
    payload = {"order_id": order_id, "reason": str(error), "flow": "orchestrated"}
    outbox_emit(aggregate_type="order", aggregate_id=order_id, event_type=event_type, payload=payload, now=ctx.now)


def refund_payment(ctx: StepContext) -> None:
    payment_refund(idempotency_key=ctx.idempotency_key, reference=ctx.input["order_id"], now=ctx.now)


def notify_fulfillment(ctx: StepContext) -> None:
    order_confirm(order_id=ctx.input["order_id"], now=ctx.now)


def release_order(saga) -> None:
    """However the saga was undone (a failed step, a cancel, an operator abort, even before
    create_order ran), a COMPENSATED saga leaves its order cancelled, never pending."""
    if saga.state == SagaState.COMPENSATED:
        order_mark_cancelled(order_id=saga.input["order_id"], reason=saga.failure_reason, now=saga.updated_at)


def _why(ctx: StepContext) -> str:
    from sagas.models import SagaInstance

    return SagaInstance.objects.values_list("failure_reason", flat=True).get(pk=ctx.saga_id)


place_order = Saga("place_order", version=1, steps=[
    Step("create_order", action=create_order, compensation=cancel_order),
    Step("reserve_inventory", action=reserve_inventory, compensation=release_inventory, on_failure=stock_unavailable),
    Step("process_payment", action=process_payment, compensation=refund_payment, on_failure=payment_failed,
         compensate_uncertain=True,
         retry=Retry(max_attempts=5, backoff=0.5, max_delay=5.0, non_retryable=(PaymentFailed,))),
    Step("notify_fulfillment", action=notify_fulfillment),
], on_finish=release_order)
