from collections.abc import Mapping

from django.db.models import F, QuerySet, Sum, Value
from django.db.models.functions import Coalesce

from inventory.models import Product, Reservation, ReservationStatus, Stock


def product_list_with_availability() -> QuerySet[Product]:
    """Products with `available` = on hand - reserved (0 without a stock row), by sku."""
    return Product.objects.annotate(
        available=Coalesce(F("stock__on_hand") - F("stock__reserved"), Value(0))
    ).order_by("sku")


def stock_ledger_violations(*, initial_on_hand: Mapping[str, int]) -> list[str]:
    """Units only leave through committed reservations: for each sku, on hand now + units
    committed must equal what was on hand at the start (sku -> units), and never be negative."""
    committed = dict(
        Reservation.objects.filter(status=ReservationStatus.COMMITTED)
        .values("product__sku")
        .annotate(units=Sum("quantity"))
        .values_list("product__sku", "units")
    )
    violations = []
    for sku, on_hand in Stock.objects.filter(product__sku__in=list(initial_on_hand)).values_list("product__sku", "on_hand"):
        if on_hand < 0:
            violations.append(f"{sku}: {on_hand} on hand")
        if on_hand + committed.get(sku, 0) != initial_on_hand[sku]:
            violations.append(
                f"{sku}: {on_hand} on hand + {committed.get(sku, 0)} committed != {initial_on_hand[sku]} at the start"
            )
    return violations
