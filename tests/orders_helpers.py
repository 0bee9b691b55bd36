"""Building shop data through the real services, and checking the shop's invariants."""

from decimal import Decimal

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.db.models import Sum

from inventory.models import Product
from inventory.services import product_create
from orders.models import Order
from orders.selectors import shop_invariant_violations
from orders.services import LineRequest, order_place
from payments.models import Payment, Refund


def a_user(username: str = "alice", *, staff: bool = False):
    user, _ = get_user_model().objects.get_or_create(username=username, defaults={"is_staff": staff})
    return user


def a_staff_user(username: str = "ops", *, permissions: tuple[str, ...] = ()):
    """A staff user (not a superuser) holding exactly `permissions`, each "app_label.codename"."""
    user = a_user(username, staff=True)
    for permission in permissions:
        app_label, codename = permission.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
    return get_user_model().objects.get(pk=user.pk)  # a fresh instance: has_perm caches what it saw


# What the staff API and the admin's saga and outbox actions need, all of it.
OPERATOR_PERMISSIONS = (
    "sagas.view_sagainstance",
    "sagas.retry_saga",
    "sagas.abort_saga",
    "sagas.view_outboxevent",
    "sagas.replay_outboxevent",
    "sagas.view_parkeddelivery",
    "sagas.replay_parkeddelivery",
)


def an_operator(username: str = "ops"):
    return a_staff_user(username, permissions=OPERATOR_PERMISSIONS)


def a_product(sku: str = "SKU-1", *, price: str = "10.00", on_hand: int = 100) -> Product:
    return product_create(sku=sku, name=f"Product {sku}", price=Decimal(price), on_hand=on_hand)


def an_order(*, user=None, lines=(("SKU-1", 2),), payment_method: str = "pm_ok", key: str | None = None) -> Order:
    user = user or a_user()
    key = key or f"key-{Order.objects.count()}-{payment_method}"
    return order_place(
        owner=user, lines=[LineRequest(sku, qty) for sku, qty in lines], payment_method=payment_method, idempotency_key=key
    ).order


def charged_minus_refunded(order: Order) -> Decimal:
    charged = Payment.objects.filter(reference=str(order.id)).aggregate(s=Sum("amount"))["s"] or Decimal("0")
    refunded = Refund.objects.filter(payment__reference=str(order.id)).aggregate(s=Sum("amount"))["s"] or Decimal("0")
    return charged - refunded


def assert_shop_invariants() -> None:
    violations = shop_invariant_violations()
    assert not violations, "\n".join(violations)
