"""Reads over payments: reconciling our records with the payment provider's own ledger."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

from payments.gateway import ProviderLedger, gateway
from payments.models import Payment, Refund


def provider_ledger_violations(ledger: ProviderLedger | None = None) -> list[str]:
    """Every way the provider's ledger and our Payment/Refund rows disagree (empty when they
    match): a charge or refund the provider made that we have no record of (money moved without
    us knowing) or the other way round, an order charged more than once, a charge refunded twice."""
    ledger = ledger or gateway().ledger()
    ours = {p.idempotency_key: p for p in Payment.objects.all()}
    violations = []
    for charge in ledger.charges:
        payment = ours.get(charge.key)
        if payment is None:
            violations.append(f"provider charged {charge.amount} under key {charge.key} ({charge.reference}); we have no payment")
        elif (payment.provider_reference, payment.amount) != (charge.reference, charge.amount):
            violations.append(f"key {charge.key}: provider {charge.reference} {charge.amount}, ours {payment.provider_reference} {payment.amount}")
    provider_keys = {c.key for c in ledger.charges}
    violations += [f"payment {key} is not in the provider's ledger" for key in ours if key not in provider_keys]
    for reference, n in Counter(p.reference for p in ours.values()).items():
        if n > 1:
            violations.append(f"{reference} was charged {n} times")
    for charge_reference, n in Counter(r.charge_reference for r in ledger.refunds).items():
        if n > 1:
            violations.append(f"charge {charge_reference} was refunded {n} times")
    our_refunds = set(Refund.objects.values_list("provider_reference", flat=True))
    provider_refunds = {r.reference for r in ledger.refunds}
    violations += [f"provider refund {ref} is not recorded by us" for ref in provider_refunds - our_refunds]
    violations += [f"refund {ref} is not in the provider's ledger" for ref in our_refunds - provider_refunds]
    return violations


def provider_net_by_reference(ledger: ProviderLedger | None = None) -> dict[str, Decimal]:
    """What the provider holds net (charged - refunded) per thing paid for (the order id), by its
    own ledger. A charge we have no payment row for cannot be attributed: provider_ledger_violations
    reports it."""
    ledger = ledger or gateway().ledger()
    reference_of = dict(Payment.objects.values_list("idempotency_key", "reference"))
    refunded = {r.charge_reference: r.amount for r in ledger.refunds}
    net: dict[str, Decimal] = {}
    for charge in ledger.charges:
        if charge.key in reference_of:
            reference = reference_of[charge.key]
            net[reference] = net.get(reference, Decimal("0")) + charge.amount - refunded.get(charge.reference, Decimal("0"))
    return net


def provider_repeated_calls(ledger: ProviderLedger | None = None) -> int:
    """Charge calls beyond the first per idempotency key: retries the key turned into no-ops or
    reconciliations instead of second charges."""
    ledger = ledger or gateway().ledger()
    return sum(count - 1 for count in ledger.calls.values() if count > 1)
