from django.db import models
from django.db.models import Q


class PaymentStatus(models.TextChoices):
    SUCCEEDED = "succeeded"
    REFUNDED = "refunded"


class Payment(models.Model):
    """A charge the provider made. `idempotency_key` is the saga step's key: one charge per step."""

    idempotency_key = models.CharField(max_length=255, unique=True)
    reference = models.CharField(max_length=100, help_text="what was paid for (the order id)")
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3)
    method = models.CharField(max_length=40)
    status = models.CharField(max_length=10, choices=PaymentStatus.choices, default=PaymentStatus.SUCCEEDED)
    provider_reference = models.CharField(max_length=100, unique=True)
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.CheckConstraint(condition=Q(amount__gt=0), name="payment_amount_positive")]
        indexes = [models.Index(fields=["reference"], name="payment_reference_idx")]  # an order's payments (its books)

    def __str__(self) -> str:
        return f"{self.amount} {self.currency} for {self.reference} ({self.status})"


class Refund(models.Model):
    payment = models.OneToOneField(Payment, on_delete=models.PROTECT, related_name="refund")
    idempotency_key = models.CharField(max_length=255, unique=True)
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    provider_reference = models.CharField(max_length=100, unique=True)
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.CheckConstraint(condition=Q(amount__gt=0), name="refund_amount_positive")]

    def __str__(self) -> str:
        return f"refund {self.amount} of {self.payment_id}"
