"""Row locks for placing orders. Must run inside transaction.atomic."""

from django.contrib.auth import get_user_model


def lock_customer(owner) -> None:
    """Serialize one customer's order placements (the pending-order cap is counted under it).
    Taken before any other row of the order, and by nothing that holds another lock first."""
    get_user_model().objects.select_for_update().filter(pk=owner.pk).values_list("pk", flat=True).first()
