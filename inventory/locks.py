"""Row locks for stock, always in primary key order so two orders can never deadlock."""

from collections.abc import Iterable

from inventory.models import Stock


def lock_stocks(product_ids: Iterable[int]) -> dict[int, Stock]:
    """Lock the stock rows of these products (inside transaction.atomic), keyed by product id."""
    rows = Stock.objects.select_for_update().filter(product_id__in=sorted(set(product_ids))).order_by("product_id")
    return {stock.product_id: stock for stock in rows}
