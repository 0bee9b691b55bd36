from django.db import models


class Effect(models.Model):
    """One row per applied effect of a test saga's step or compensation: duplicates are countable."""

    saga_id = models.UUIDField()
    step = models.CharField(max_length=100)
    direction = models.CharField(max_length=10)
    created_at = models.DateTimeField(auto_now_add=True)
    pid = models.PositiveIntegerField()

    class Meta:
        ordering = ["id"]


class Wallet(models.Model):
    """The README's example: money moves between wallets, never below zero."""

    balance = models.DecimalField(max_digits=12, decimal_places=2)

    class Meta:
        constraints = [models.CheckConstraint(condition=models.Q(balance__gte=0), name="wallet_balance_not_negative")]
