"""Read-only admin for payments and refunds: money moves only through the payment services."""

from __future__ import annotations

from django.contrib import admin
from django.utils.safestring import SafeString

from payments.models import Payment, PaymentStatus, Refund
from sagas.admin import BLUE, GREEN, ReadOnlyAdminMixin, state_badge

PAYMENT_COLOURS = {PaymentStatus.SUCCEEDED: GREEN, PaymentStatus.REFUNDED: BLUE}


class RefundInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = Refund
    extra = 0
    fields = ["amount", "provider_reference", "idempotency_key", "created_at"]
    readonly_fields = fields


@admin.register(Payment)
class PaymentAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "reference", "amount", "currency", "method", "coloured_status", "provider_reference", "created_at"]
    list_filter = ["status", "method", "currency", ("created_at", admin.DateFieldListFilter)]
    search_fields = ["reference", "provider_reference", "idempotency_key"]
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in Payment._meta.fields]
    inlines = [RefundInline]

    @admin.display(description="status", ordering="status")
    def coloured_status(self, payment: Payment) -> SafeString:
        return state_badge(payment.status, PAYMENT_COLOURS)


@admin.register(Refund)
class RefundAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "payment", "amount", "provider_reference", "created_at"]
    list_filter = [("created_at", admin.DateFieldListFilter)]
    search_fields = ["payment__reference", "provider_reference", "idempotency_key"]
    date_hierarchy = "created_at"
    list_select_related = ["payment"]
    readonly_fields = [f.name for f in Refund._meta.fields]
