"""Charging and refunding through the gateway, idempotent per key."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal

from django.db import transaction

from payments.gateway import gateway
from payments.models import Payment, PaymentStatus, Refund
from sagas.outbox import outbox_emit


@transaction.atomic
def payment_charge(
    *, idempotency_key: str, reference: str, amount: Decimal, currency: str, method: str, now: datetime, flow: str = "orchestrated"
) -> Payment:
    """Charge `amount` once per key. A retry after a lost response finds the provider's charge by
    the same key instead of charging again. Raises PaymentDeclined, InsufficientFunds (business)
    and GatewayError (transient)."""
    existing = Payment.objects.filter(idempotency_key=idempotency_key).first()
    if existing is not None:
        return existing
    charge = gateway().charge(key=idempotency_key, amount=amount, currency=currency, method=method)
    payment = Payment.objects.create(
        idempotency_key=idempotency_key,
        reference=reference,
        amount=charge.amount,
        currency=charge.currency,
        method=method,
        provider_reference=charge.reference,
        created_at=now,
    )
    outbox_emit(
        aggregate_type="order",
        aggregate_id=reference,
        event_type="PAYMENT_PROCESSED",
        payload={"order_id": reference, "amount": charge.amount, "currency": charge.currency, "payment": charge.reference, "flow": flow},
        now=now,
    )
    return payment


@transaction.atomic
def payment_refund(*, idempotency_key: str, now: datetime, reference: str | None = None) -> Refund | None:
    """Refund the charge made with `idempotency_key` in full, once. A no-op (None) when no
    charge was made. When we never learnt of the charge (every response was lost) but the
    provider made it, it is recorded from the provider first (needs `reference`, what was paid
    for). Raises GatewayError (transient)."""
    payment = Payment.objects.select_for_update().filter(idempotency_key=idempotency_key).first()
    if payment is None and reference is not None:
        payment = _payment_reconcile(idempotency_key=idempotency_key, reference=reference, now=now)
    if payment is None:
        return None
    existing = Refund.objects.filter(payment=payment).first()
    if existing is not None:
        return existing
    refund_key = f"{idempotency_key}:refund"
    provider_refund = gateway().refund(key=refund_key, charge_reference=payment.provider_reference, amount=payment.amount)
    refund = Refund.objects.create(
        payment=payment,
        idempotency_key=refund_key,
        amount=provider_refund.amount,
        provider_reference=provider_refund.reference,
        created_at=now,
    )
    payment.status = PaymentStatus.REFUNDED
    payment.save(update_fields=["status"])
    outbox_emit(
        aggregate_type="order",
        aggregate_id=payment.reference,
        event_type="PAYMENT_REFUNDED",
        payload={"order_id": payment.reference, "amount": refund.amount, "refund": refund.provider_reference},
        now=now,
    )
    return refund


def _payment_reconcile(*, idempotency_key: str, reference: str, now: datetime) -> Payment | None:
    charge = gateway().find_charge(key=idempotency_key)
    if charge is None:
        return None
    return Payment.objects.create(
        idempotency_key=idempotency_key,
        reference=reference,
        amount=charge.amount,
        currency=charge.currency,
        method="reconciled",
        provider_reference=charge.reference,
        created_at=now,
    )
