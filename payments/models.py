from django.db import models
from django.db.models import Q


def unique_keys(table: str, *fields: str) -> list[models.UniqueConstraint]:
    """Each field unique, as `unique=True` made it (the constraint keeps the name PostgreSQL gave
    it then), without the second index `unique=True` adds to a CharField on PostgreSQL for
    `LIKE 'abc%'` (varchar_pattern_ops): keys are looked up whole, never by their start."""
    return [models.UniqueConstraint(fields=[field], name=f"{table}_{field}_key") for field in fields]


class PaymentStatus(models.TextChoices):
    SUCCEEDED = "succeeded"
    REFUNDED = "refunded"


class Payment(models.Model):
    """A charge the provider made. `idempotency_key` is the saga step's key: one charge per step."""

    idempotency_key = models.CharField(max_length=255)  # unique: see Meta
    reference = models.CharField(max_length=100, help_text="what was paid for (the order id)")
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3)
    method = models.CharField(max_length=40)
    status = models.CharField(max_length=10, choices=PaymentStatus.choices, default=PaymentStatus.SUCCEEDED)
    provider_reference = models.CharField(max_length=100)  # unique: see Meta
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="payment_amount_positive"),
            *unique_keys("payments_payment", "idempotency_key", "provider_reference"),
        ]
        indexes = [
            # Newest first, as the admin lists them (and its date filter); what was paid for, as
            # the admin searches it (an order id).
            models.Index(fields=["-created_at", "-id"], name="payment_created_idx"),
            models.Index(fields=["reference"], name="payment_reference_idx"),
            # The refunded ones, newest first: the admin's "refunded" filter, whatever their share.
            models.Index(fields=["-created_at", "-id"], condition=Q(status="refunded"), name="payment_refunded_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.amount} {self.currency} for {self.reference} ({self.status})"


class Refund(models.Model):
    payment = models.OneToOneField(Payment, on_delete=models.PROTECT, related_name="refund")
    idempotency_key = models.CharField(max_length=255)  # unique: see Meta
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    provider_reference = models.CharField(max_length=100)  # unique: see Meta
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="refund_amount_positive"),
            *unique_keys("payments_refund", "idempotency_key", "provider_reference"),
        ]

    def __str__(self) -> str:
        return f"refund {self.amount} of {self.payment_id}"
