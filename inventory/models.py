from django.db import models
from django.db.models import F, Q


class Product(models.Model):
    sku = models.CharField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    price = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3, default="EUR")

    class Meta:
        ordering = ["sku"]
        constraints = [models.CheckConstraint(condition=Q(price__gt=0), name="product_price_positive")]

    def __str__(self) -> str:
        return f"{self.sku} {self.name}"


class Stock(models.Model):
    """Units on hand, and how many of them reservations hold. The database guards the invariants."""

    product = models.OneToOneField(Product, on_delete=models.CASCADE, primary_key=True, related_name="stock")
    on_hand = models.IntegerField(default=0)
    reserved = models.IntegerField(default=0)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(on_hand__gte=0), name="stock_on_hand_not_negative"),
            models.CheckConstraint(condition=Q(reserved__gte=0), name="stock_reserved_not_negative"),
            models.CheckConstraint(condition=Q(reserved__lte=F("on_hand")), name="stock_reserved_within_on_hand"),
        ]

    def __str__(self) -> str:
        return f"{self.product_id}: {self.on_hand} on hand, {self.reserved} reserved"

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved


class ReservationStatus(models.TextChoices):
    RESERVED = "reserved"
    RELEASED = "released"
    COMMITTED = "committed"


SETTLED_RESERVATIONS = (ReservationStatus.RELEASED, ReservationStatus.COMMITTED)


class Reservation(models.Model):
    """Units of one product held for one saga (one order)."""

    saga_id = models.UUIDField()
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="reservations")
    quantity = models.PositiveIntegerField()
    status = models.CharField(max_length=10, choices=ReservationStatus.choices, default=ReservationStatus.RESERVED)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["saga_id", "product"], name="reservation_one_per_saga_product"),
            models.CheckConstraint(condition=Q(quantity__gt=0), name="reservation_quantity_positive"),
        ]
        indexes = [
            # The reservations still holding stock, newest first: few at any time, however long
            # the history (the admin's "reserved" filter).
            models.Index(fields=["-id"], condition=Q(status="reserved"), name="reservation_held_idx"),
            # The units reservations hold, per product (the stock invariant), without the settled history.
            models.Index(fields=["product", "quantity"], condition=Q(status=ReservationStatus.RESERVED), name="reservation_held_units_idx"),
            # Retention (inventory.services.reservations_prune): the settled ones, oldest first.
            models.Index(fields=["updated_at"], condition=Q(status__in=SETTLED_RESERVATIONS), name="reservation_settled_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.quantity} x {self.product_id} for {self.saga_id} ({self.status})"
