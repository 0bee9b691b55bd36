"""Admin for the catalogue and the warehouse. Products may be added and renamed or repriced here;
stock and reservations are only shown: they change through the reservation services alone."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Q
from django.utils.safestring import SafeString

from inventory.models import Product, Reservation, ReservationStatus, Stock
from inventory.services import product_create
from sagas.admin import AMBER, GREEN, GREY, HistoryAdminMixin, ReadOnlyAdminMixin, state_badge
from sagas.admin_lists import any_of, number_q, uuid_q

RESERVATION_COLOURS = {ReservationStatus.RESERVED: AMBER, ReservationStatus.COMMITTED: GREEN, ReservationStatus.RELEASED: GREY}


class StockInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = Stock
    extra = 0
    fields = ["on_hand", "reserved", "available"]
    readonly_fields = fields

    @admin.display(description="available")
    def available(self, stock: Stock) -> int:
        return stock.available


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ["sku", "name", "price", "currency", "on_hand", "reserved", "available"]
    search_fields = ["sku", "name"]
    list_filter = ["currency"]
    list_select_related = ["stock"]
    fields = ["sku", "name", "price", "currency"]

    def get_readonly_fields(self, request, obj=None):
        # Order items copy the sku, and an order's items must share one currency: both stay fixed.
        return ["sku", "currency"] if obj else []

    def get_inlines(self, request, obj):
        return [StockInline] if obj else []

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # orders and reservations point at products

    def save_model(self, request, obj: Product, form, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)  # the form holds name and price only
            return
        # Through the service, so the product gets its stock row (empty: stock arrives by service).
        product = product_create(sku=obj.sku, name=obj.name, price=obj.price, currency=obj.currency)
        obj.pk, obj._state.adding, obj._state.db = product.pk, False, product._state.db

    @admin.display(description="on hand", ordering="stock__on_hand")
    def on_hand(self, product: Product) -> int | None:
        stock = _stock(product)
        return stock.on_hand if stock else None

    @admin.display(description="reserved", ordering="stock__reserved")
    def reserved(self, product: Product) -> int | None:
        stock = _stock(product)
        return stock.reserved if stock else None

    @admin.display(description="available")
    def available(self, product: Product) -> int | None:
        stock = _stock(product)
        return stock.available if stock else None


def _stock(product: Product) -> Stock | None:
    try:
        return product.stock
    except Stock.DoesNotExist:
        return None


@admin.register(Reservation)
class ReservationAdmin(HistoryAdminMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "saga_id", "product", "quantity", "coloured_status", "created_at", "updated_at"]
    # No date filter: no index on created_at (the order's own dates are in the order admin).
    list_filter = ["status"]
    search_fields = ["id", "saga_id", "product__sku"]
    search_help_text = "A reservation id, a saga (or order) id or its first characters, or a product's sku, whole."
    ordering = ["-id"]  # newest first, through the primary key
    sortable_by = ["id"]
    list_select_related = ["product"]
    readonly_fields = [f.name for f in Reservation._meta.fields]

    def search_q(self, term: str) -> Q | None:
        # The products first, as a list of ids: ORed with the others, each condition is an index scan.
        products = list(Product.objects.filter(sku=term).values_list("pk", flat=True))
        return any_of(number_q("id", term), uuid_q("saga_id", term), Q(product_id__in=products) if products else None)

    @admin.display(description="status", ordering="status")
    def coloured_status(self, reservation: Reservation) -> SafeString:
        return state_badge(reservation.status, RESERVATION_COLOURS)
