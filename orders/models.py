import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q


class OrderStatus(models.TextChoices):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    CANCELLED = "cancelled"


class Flow(models.TextChoices):
    ORCHESTRATED = "orchestrated"
    CHOREOGRAPHED = "choreographed"


class Order(models.Model):
    """An order. While it is pending its saga owns it: only the saga's steps change it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: the indexes below lead with it.
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="orders", db_index=False)
    status = models.CharField(max_length=10, choices=OrderStatus.choices, default=OrderStatus.PENDING)
    total = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3)
    payment_method = models.CharField(max_length=40)
    flow = models.CharField(max_length=16, choices=Flow.choices, default=Flow.ORCHESTRATED)
    # Emptied when retention prunes the saga's log (sagas.retention); the order keeps the summary below.
    saga = models.OneToOneField("sagas.SagaInstance", null=True, blank=True, on_delete=models.SET_NULL, related_name="order")
    cancel_reason = models.TextField(blank=True)
    # What the order keeps of its saga once the saga was pruned (orders.receivers): which saga it
    # was (what its reservations and payment are keyed by), how and when it ended, and why it was
    # undone in staff's words (the customer's are in cancel_reason). Empty while the saga is kept.
    # (Defaults in the database too: rows written by SQL, e.g. perf.history, need not name them.)
    pruned_saga_id = models.UUIDField(null=True, blank=True)
    saga_outcome = models.CharField(
        max_length=16, blank=True, default="", db_default="", help_text="its saga's final state, once the saga was pruned"
    )
    saga_finished_at = models.DateTimeField(null=True, blank=True)
    saga_failure_reason = models.TextField(blank=True, default="", db_default="")
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(total__gt=0), name="order_total_positive"),
            models.CheckConstraint(condition=Q(status__in=OrderStatus.values), name="order_status_valid"),
        ]
        indexes = [
            # A customer's orders in a status (GET /api/orders/?status=, the pending orders a
            # customer may have at once).
            models.Index(fields=["owner", "status", "-created_at"], name="order_owner_status_idx"),
            # A customer's orders newest first, a page at a time (GET /api/orders/).
            models.Index(fields=["owner", "-created_at", "-id"], name="order_owner_created_idx"),
            # Every order newest first, as the admin lists them (and its date filter).
            models.Index(fields=["-created_at", "-id"], name="order_created_idx"),
            # The orders still in progress, newest first: few at any time, however long the
            # history (the admin's "pending" filter).
            models.Index(fields=["-created_at", "-id"], condition=Q(status="pending"), name="order_pending_idx"),
        ]

    def __str__(self) -> str:
        return f"order {self.id} ({self.status})"

    @property
    def correlation_id(self):
        """What reservations and payments of this order are keyed by: its saga (kept or pruned), or
        in the choreographed flow (no saga) the order itself."""
        return self.saga_id or self.pruned_saga_id or self.id

    @property
    def saga_pruned(self) -> bool:
        return self.saga_id is None and self.pruned_saga_id is not None


class OrderItem(models.Model):
    # No index of its own: order_item_one_line_per_product leads with it.
    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="items", db_index=False)
    product = models.ForeignKey("inventory.Product", on_delete=models.PROTECT)
    sku = models.CharField(max_length=64)
    quantity = models.PositiveIntegerField()
    unit_price = models.DecimalField(max_digits=12, decimal_places=2)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["order", "product"], name="order_item_one_line_per_product"),
            models.CheckConstraint(condition=Q(quantity__gte=1) & Q(quantity__lte=1000), name="order_item_quantity_range"),
        ]

    @property
    def line_total(self):
        return self.unit_price * self.quantity


class IdempotencyRecordState(models.TextChoices):
    IN_FLIGHT = "in_flight"
    DONE = "done"


class IdempotencyRecord(models.Model):
    """One per (user, Idempotency-Key) of POST /api/orders/. Committed before the order is
    written, so a concurrent request with the same key sees it in flight (409)."""

    # No index of its own: idempotency_key_unique_per_user leads with it.
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, db_index=False)
    key = models.CharField(max_length=255)
    fingerprint = models.CharField(max_length=64, help_text="sha256 of the canonical request body")
    state = models.CharField(max_length=10, choices=IdempotencyRecordState.choices, default=IdempotencyRecordState.IN_FLIGHT)
    order = models.OneToOneField(Order, null=True, blank=True, on_delete=models.CASCADE)
    created_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["owner", "key"], name="idempotency_key_unique_per_user")]
        indexes = [models.Index(fields=["created_at"], name="idempotency_created_idx")]  # retention, oldest first
