"""The place-order saga, orchestrated: each step is one service call, undone newest-first."""

from datetime import timedelta

from django.conf import settings

from sagas import Failure, Outcome, Retry, Saga, Step, StepContext
from sagas.models import Direction, SagaState, StepState
from sagas.outbox import outbox_emit

from inventory.services import OutOfStock, stock_release, stock_reserve
from orders.models import Order
from orders.selectors import order_quantities
from orders.services import CANCELLED_BY_CUSTOMER, order_accept, order_confirm, order_mark_cancelled
from payments.gateway import PaymentFailed
from payments.services import payment_charge, payment_refund


def create_order(ctx: StepContext) -> dict:
    order = order_accept(order_id=ctx.input["order_id"])
    return {"order_id": str(order.id), "total": order.total}


def cancel_order(ctx: StepContext) -> None:
    order_mark_cancelled(order_id=ctx.input["order_id"], reason=customer_reason(ctx.reason), now=ctx.now)


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


def release_order(outcome: Outcome) -> None:
    """However the saga was undone (a failed step, a cancel, an operator abort, even before
    create_order ran), a COMPENSATED saga leaves its order cancelled, never pending."""
    if outcome.state == SagaState.COMPENSATED:
        order_mark_cancelled(order_id=outcome.input["order_id"], reason=customer_reason(outcome.failure), now=outcome.finished_at)


# --- what the customer is told ---------------------------------------------------------------------
# The saga log's last_error and failure_reason are for staff (exception type, message, file and
# line). A customer reads a business refusal's own message (StepExecution.reason), the reason the
# saga was stopped on request, or else one of these neutral sentences.
STEP_FAILED_TEXT = {
    "create_order": "the order could not be accepted",
    "reserve_inventory": "the items could not be reserved",
    "process_payment": "the payment could not be completed",
    "notify_fulfillment": "the order could not be handed over for delivery",
}
UNDO_FAILED_TEXT = "undoing this step is delayed; our staff have been notified"
PAYMENT_TOO_LATE_TEXT = "the payment was not confirmed in time"
CANCELLED_BY_SUPPORT = "cancelled by our support team"
DEADLINE_EXCEEDED = "deadline exceeded"  # the engine's reason when the sweeper or a step finds the deadline passed


def customer_reason(failure: Failure | None) -> str:
    """Why the order's saga was undone (sagas.Failure), in words fit for the customer."""
    if failure is None:
        return "the order could not be completed"
    if failure.refusal:
        return failure.refusal  # a business refusal: "card declined by the issuer"
    if failure.reason == DEADLINE_EXCEEDED:
        return PAYMENT_TOO_LATE_TEXT
    if failure.reason == CANCELLED_BY_CUSTOMER:
        return failure.reason
    if failure.reason.startswith("aborted by "):
        return CANCELLED_BY_SUPPORT  # which operator did it is for staff to know
    if failure.step is not None:
        return STEP_FAILED_TEXT.get(failure.step, "the order could not be completed")
    return "the order could not be completed"


def customer_step_text(execution) -> str:
    """What went wrong with one step of the timeline, for the customer; "" when nothing did."""
    if execution.state != StepState.FAILED:
        return ""
    if execution.reason:
        return execution.reason
    if execution.direction == Direction.COMPENSATE:
        return UNDO_FAILED_TEXT
    return STEP_FAILED_TEXT.get(execution.name, "this step could not be completed")


# Stock is held from reserve_inventory until the payment settles: an order whose payment never
# answers is undone at this deadline (the sweeper, or the step's next try, compensates it), and
# that releases the stock. Sagas keep the deadline_at they started with.
PAYMENT_DEADLINE = timedelta(seconds=settings.ORDER_PAYMENT_DEADLINE)

place_order = Saga("place_order", version=1, steps=[
    Step("create_order", action=create_order, compensation=cancel_order),
    Step("reserve_inventory", action=reserve_inventory, compensation=release_inventory, on_failure=stock_unavailable),
    Step("process_payment", action=process_payment, compensation=refund_payment, on_failure=payment_failed,
         compensate_uncertain=True,
         retry=Retry(max_attempts=5, initial_delay=0.5, max_delay=5.0, non_retryable=(PaymentFailed,))),
    Step("notify_fulfillment", action=notify_fulfillment),
], on_finish=release_order, deadline=PAYMENT_DEADLINE)
