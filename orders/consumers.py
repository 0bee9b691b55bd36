"""Orders in the choreographed flow: confirm once stock is reserved; cancel when payment failed or
stock was unavailable (payments then refunds on ORDER_CANCELLED: the compensating event)."""

from django.utils import timezone

from orders.services import order_confirm, order_mark_cancelled
from sagas.consumers import ConsumedEvent, subscribe


@subscribe("orders", events=["INVENTORY_RESERVED", "PAYMENT_FAILED", "STOCK_UNAVAILABLE"], where={"flow": "choreographed"})
def on_order_progress(event: ConsumedEvent) -> None:
    order_id = event.payload["order_id"]
    if event.type == "INVENTORY_RESERVED":
        order_confirm(order_id=order_id, now=timezone.now())
    elif event.type in ("PAYMENT_FAILED", "STOCK_UNAVAILABLE"):
        reason = f"{event.type.lower().replace('_', ' ')}: {event.payload.get('reason', '')}"
        order_mark_cancelled(order_id=order_id, reason=reason, now=timezone.now())
