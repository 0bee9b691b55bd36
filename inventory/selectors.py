from django.db.models import F, QuerySet, Value
from django.db.models.functions import Coalesce

from inventory.models import Product


def product_list_with_availability() -> QuerySet[Product]:
    """Products with `available` = on hand - reserved (0 without a stock row), by sku."""
    return Product.objects.annotate(
        available=Coalesce(F("stock__on_hand") - F("stock__reserved"), Value(0))
    ).order_by("sku")
