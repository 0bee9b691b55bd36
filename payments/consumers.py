"""Payments in the choreographed order flow: charge on ORDER_CREATED, refund on ORDER_CANCELLED."""

from decimal import Decimal

from django.utils import timezone

from payments.gateway import PaymentFailed
from payments.services import payment_charge, payment_refund
from sagas.consumers import ConsumedEvent, subscribe
from sagas.outbox import outbox_emit

CHOREOGRAPHED = "choreographed"


def charge_key(order_id: str) -> str:
    return f"{order_id}:payment"


UNCONFIRMED = "the payment could not be confirmed; any charge made was refunded"


def settle_uncertain_charge(event: ConsumedEvent, reason: str) -> None:
    """When payments gives up on an order (every answer of the provider was lost, say), the charge
    may have gone through: find it by its key and refund it, then tell the order it failed. In
    the transaction that parks the event. A given-up refund (ORDER_CANCELLED) is left parked for
    an operator: there is nothing to settle without knowing why it failed."""
    if event.type != "ORDER_CREATED":
        return
    order_id = event.payload["order_id"]
    now = timezone.now()
    payment_refund(idempotency_key=charge_key(order_id), reference=order_id, now=now)
    outbox_emit(
        aggregate_type="order",
        aggregate_id=order_id,
        event_type="PAYMENT_FAILED",
        payload={"order_id": order_id, "reason": UNCONFIRMED, "flow": CHOREOGRAPHED},
        now=now,
    )


# Orchestrated orders are charged and refunded by their saga's own step: not sent here.
# savepoints=True: a declined charge raises out of payment_charge's atomic block and is answered
# with PAYMENT_FAILED in the same transaction.
@subscribe(
    "payments",
    events=["ORDER_CREATED", "ORDER_CANCELLED"],
    where={"flow": CHOREOGRAPHED},
    on_give_up=settle_uncertain_charge,
    savepoints=True,
)
def on_order_event(event: ConsumedEvent) -> None:
    order_id = event.payload["order_id"]
    now = timezone.now()
    if event.type == "ORDER_CANCELLED":
        # A no-op when nothing was charged under this key.
        payment_refund(idempotency_key=charge_key(order_id), reference=order_id, now=now)
        return
    try:
        payment_charge(
            idempotency_key=charge_key(order_id),
            reference=order_id,
            amount=Decimal(event.payload["total"]),
            currency=event.payload["currency"],
            method=event.payload["payment_method"],
            now=now,
            flow=CHOREOGRAPHED,
        )
    except PaymentFailed as exc:
        outbox_emit(
            aggregate_type="order",
            aggregate_id=order_id,
            event_type="PAYMENT_FAILED",
            payload={"order_id": order_id, "reason": str(exc), "flow": CHOREOGRAPHED},
            now=now,
        )
    # GatewayError (transient) propagates: the consume task retries with backoff, and the charge
    # is reconciled by its key.
