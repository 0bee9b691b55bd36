"""Read-only admin for payments and refunds: money moves only through the payment services."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Q
from django.utils.safestring import SafeString

from payments.gateway import PAYMENT_METHODS
from payments.models import Payment, PaymentStatus, Refund
from sagas.admin import BLUE, GREEN, HistoryAdminMixin, ReadOnlyAdminMixin, state_badge
from sagas.admin_lists import any_of, choices_filter, number_q, recent_values

PAYMENT_COLOURS = {PaymentStatus.SUCCEEDED: GREEN, PaymentStatus.REFUNDED: BLUE}


class RefundInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = Refund
    extra = 0
    fields = ["amount", "provider_reference", "idempotency_key", "created_at"]
    readonly_fields = fields


def recent_currencies() -> list[str]:
    """The currencies of the newest payments (no index leads with the currency)."""
    return recent_values(Payment.objects.all(), "currency")


@admin.register(Payment)
class PaymentAdmin(HistoryAdminMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "reference", "amount", "currency", "method", "coloured_status", "provider_reference", "created_at"]
    list_filter = [
        "status",
        choices_filter("method", lambda: PAYMENT_METHODS),
        choices_filter("currency", recent_currencies),
        ("created_at", admin.DateFieldListFilter),
    ]
    search_fields = ["id", "reference", "provider_reference", "idempotency_key"]
    search_help_text = "A payment id, what was paid for (an order id), or a provider reference or idempotency key, whole."
    ordering = ["-created_at", "-id"]  # payment_created_idx
    sortable_by = ["id", "created_at"]
    readonly_fields = [f.name for f in Payment._meta.fields]
    inlines = [RefundInline]

    @admin.display(description="status", ordering="status")
    def coloured_status(self, payment: Payment) -> SafeString:
        return state_badge(payment.status, PAYMENT_COLOURS)

    def search_q(self, term: str) -> Q | None:
        return any_of(number_q("id", term), Q(reference=term), Q(provider_reference=term), Q(idempotency_key=term))


@admin.register(Refund)
class RefundAdmin(HistoryAdminMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "payment", "amount", "provider_reference", "created_at"]
    list_filter = [("created_at", admin.DateFieldListFilter)]
    search_fields = ["id", "payment__reference", "provider_reference", "idempotency_key"]
    search_help_text = "A refund id, what was paid for (an order id), or a provider reference or idempotency key, whole."
    ordering = ["-id"]  # newest first, through the primary key
    sortable_by = ["id"]
    list_select_related = ["payment"]
    readonly_fields = [f.name for f in Refund._meta.fields]

    def search_q(self, term: str) -> Q | None:
        # The payments first, as a list of ids: ORed with the others, each condition is an index scan.
        payments = list(Payment.objects.filter(reference=term).values_list("pk", flat=True)[:100])
        return any_of(
            number_q("id", term),
            Q(payment_id__in=payments) if payments else None,
            Q(provider_reference=term),
            Q(idempotency_key=term),
        )
