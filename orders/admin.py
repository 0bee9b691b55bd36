"""Admin for orders: view them with their items and their saga's timeline, cancel them through
the order service. Money, status and the saga link are never edited here."""

from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.db.models import Q, QuerySet
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from orders.models import Order, OrderItem, OrderStatus
from orders.selectors import order_events
from orders.services import OrderNotCancellable, order_cancel
from sagas.admin import (
    AMBER,
    GREEN,
    GREY,
    HistoryAdminMixin,
    OperatedAdminMixin,
    ReadOnlyAdminMixin,
    saga_timeline_table,
    state_badge,
    when,
)
from sagas.admin_lists import any_of, uuid_q
from sagas.exceptions import SagaNotFound
from sagas.models import SagaInstance

ORDER_COLOURS = {OrderStatus.PENDING: AMBER, OrderStatus.CONFIRMED: GREEN, OrderStatus.CANCELLED: GREY}


class OrderItemInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = OrderItem
    extra = 0
    fields = ["sku", "product", "quantity", "unit_price", "line_total"]
    readonly_fields = fields

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("product")  # shown per line: one query, not one a line


@admin.register(Order)
class OrderAdmin(HistoryAdminMixin, OperatedAdminMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["id", "owner", "coloured_status", "total", "currency", "flow", "created_at", "saga_state"]
    list_filter = ["status", "flow", ("created_at", admin.DateFieldListFilter)]
    search_fields = ["id", "saga_id", "owner__username", "owner__email"]
    search_help_text = "An order or saga id (or its first characters), or a customer's username or email, whole."
    ordering = ["-created_at", "-id"]  # order_created_idx; "pending": order_pending_idx
    sortable_by = ["id", "created_at"]
    list_select_related = ["owner", "saga"]
    inlines = [OrderItemInline]
    actions = ["cancel_selected"]
    fieldsets = [
        (None, {"fields": ["id", "owner", "status", "total", "currency", "payment_method", "flow"]}),
        ("Saga", {"fields": ["saga_link", "cancel_reason", "saga_failure_reason"]}),
        ("Events", {"fields": ["events_table"]}),
        ("Dates", {"fields": ["created_at", "updated_at"]}),
    ]
    # Everything is read-only even for a user granted "change order": only services change orders.
    readonly_fields = [*(f.name for f in Order._meta.fields), "saga_link", "events_table"]

    def search_q(self, term: str) -> Q | None:
        return any_of(uuid_q("id", term), uuid_q("saga_id", term), _owned_by(term))

    @admin.display(description="events, in order")
    def events_table(self, order: Order) -> SafeString:
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((e.sequence, e.event_type, when(e.created_at), when(e.published_at)) for e in order_events(order.id)),
        )
        return format_html(
            "<table><thead><tr><th>#</th><th>Event</th><th>Emitted</th><th>Published</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="status", ordering="status")
    def coloured_status(self, order: Order) -> SafeString:
        return state_badge(order.status, ORDER_COLOURS)

    @admin.display(description="saga", ordering="saga__state")
    def saga_state(self, order: Order) -> SafeString | str:
        if order.saga_pruned:
            return state_badge(order.saga_outcome)
        return state_badge(order.saga.state) if order.saga_id else "-"

    @admin.display(description="saga")
    def saga_link(self, order: Order) -> SafeString | str:
        if order.saga_pruned:  # retention deleted its log; the order kept this summary
            return format_html(
                "{} {} finished {}; its log was pruned after the retention period",
                order.pruned_saga_id, state_badge(order.saga_outcome), when(order.saga_finished_at),
            )
        if not order.saga_id:
            return "-"
        url = reverse("admin:sagas_sagainstance_change", args=[order.saga_id])
        return format_html('<a href="{}">{}</a> {}', url, order.saga_id, state_badge(order.saga.state))

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        saga = SagaInstance.objects.prefetch_related("steps").filter(pk=obj.saga_id).first() if obj else None
        context["saga_timeline"] = saga_timeline_table(saga) if saga else ""
        return super().render_change_form(request, context, add=add, change=change, form_url=form_url, obj=obj)

    @admin.action(description="Cancel selected orders", permissions=["operate"])
    def cancel_selected(self, request, queryset: QuerySet[Order]) -> None:
        for order in queryset.order_by("created_at"):
            was_cancelled = order.status == OrderStatus.CANCELLED
            try:
                order = order_cancel(order=order)
            except OrderNotCancellable as exc:
                self.message_user(request, str(exc), messages.WARNING)
                continue
            except SagaNotFound as exc:
                self.message_user(request, f"order {order.id}: {exc}", messages.ERROR)
                continue
            if was_cancelled:
                self.message_user(request, f"order {order.id} was already cancelled", messages.INFO)
            elif order.status == OrderStatus.CANCELLED:
                self.message_user(request, f"order {order.id} cancelled", messages.SUCCESS)
            else:
                saga_state = SagaInstance.objects.values_list("state", flat=True).get(pk=order.saga_id)
                self.message_user(
                    request,
                    f"order {order.id}: cancellation started, its saga is {saga_state}; the order is cancelled "
                    "once the compensations have run",
                    messages.SUCCESS,
                )


def _owned_by(term: str) -> Q | None:
    """Orders of the customer whose username (or email) is `term`. The customers are looked up
    first, so the orders' condition is a list of ids: ORed with the id ranges, each is an index
    scan (a subquery there would make PostgreSQL filter every order through it)."""
    user_model = get_user_model()
    users = user_model.objects.filter(**{user_model.USERNAME_FIELD: term})
    if "@" in term:
        users = users | user_model.objects.filter(email__iexact=term)  # no index: a scan of the customers, not of orders
    owners = list(users.values_list("pk", flat=True)[:100])
    return Q(owner_id__in=owners) if owners else None


# --- customers ------------------------------------------------------------------------------------
# Every customer is a user: with a long history the user list grows like the orders. Django's
# UserAdmin counts the whole table twice a page and searches with LIKE '%term%' on four columns;
# this one shows an estimated count and finds a user by exact username or email (both indexed).
admin.site.unregister(get_user_model())


@admin.register(get_user_model())
class CustomerAwareUserAdmin(HistoryAdminMixin, UserAdmin):
    search_help_text = "A username or an email address, whole."
    ordering = ["username"]  # auth_user_username_key
    sortable_by = ["username"]

    def search_q(self, term: str) -> Q | None:
        return Q(username=term) | Q(email__iexact=term)
