"""Inventory in the choreographed order flow: reserve stock once the payment went through."""

from django.utils import timezone

from inventory.services import OutOfStock, stock_reserve
from sagas.consumers import ConsumedEvent, subscribe
from sagas.outbox import outbox_emit


# savepoints=True: OutOfStock raises out of stock_reserve's atomic block and is answered with
# STOCK_UNAVAILABLE in the same transaction.
@subscribe("inventory", events=["PAYMENT_PROCESSED"], where={"flow": "choreographed"}, savepoints=True)
def on_payment_processed(event: ConsumedEvent) -> None:
    from orders.selectors import order_quantities  # the order's lines, read through orders' selector

    order_id = event.payload["order_id"]
    now = timezone.now()
    try:
        stock_reserve(saga_id=order_id, order_id=order_id, quantities=order_quantities(order_id), now=now, flow="choreographed")
    except OutOfStock as exc:
        outbox_emit(
            aggregate_type="order",
            aggregate_id=order_id,
            event_type="STOCK_UNAVAILABLE",
            payload={"order_id": order_id, "reason": str(exc), "flow": "choreographed"},
            now=now,
        )
