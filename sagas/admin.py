"""Admin for the saga log: read-only, because the log is written only by the engine.

Operators act on sagas through two actions that call the engine's services (retry a FAILED saga's
compensation, abort a running saga), each behind its own permission, the staff API's
(sagas.permissions); nothing in the admin writes a saga row itself.

Also home to the small helpers the domain apps' admins share (the read-only mixin, the state
badges and the timeline table): they depend on the engine, never the reverse.
"""

from __future__ import annotations

import json
from datetime import timedelta

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import F, Q, QuerySet
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from sagas import attention
from sagas.admin_lists import (
    EstimatedCountPaginator,
    IndexedSearchMixin,
    SortableByChangeList,
    any_of,
    choices_filter,
    distinct_values,
    number_q,
    recent_values,
    uuid_q,
)
from sagas.definition import registered
from sagas.exceptions import SagaStateConflict
from sagas.models import (
    ACTIVE_STATES,
    Fault,
    InboxMessage,
    OutboxEvent,
    ParkedDelivery,
    RejectedMessage,
    SagaInstance,
    SagaState,
    StepExecution,
    StepState,
    WorkerHeartbeat,
)
from sagas.consumers import consumer_replay, subscriptions
from sagas.permissions import ABORT_SAGA, REDRIVE_SAGA, REPLAY_OUTBOX_EVENT, REPLAY_PARKED_DELIVERY, RETRY_SAGA
from sagas.relay import outbox_replay
from sagas.selectors import outbox_stats, saga_timeline
from sagas.services import saga_abort, saga_redrive, saga_retry_compensation
from sagas.timeline import duration_ms, lost_deliveries, saga_timeline_svg

GREEN, RED, AMBER, GREY, BLUE = "#2e7d32", "#c62828", "#ef8f00", "#757575", "#1565c0"

# The admin index shows the "needs attention" panel (sagas.attention) above the apps. No app list
# down the side of every page: at 1280 px it leaves the lists too narrow for their columns.
admin.site.index_template = "admin/sagas_index.html"
admin.site.enable_nav_sidebar = False

STATE_COLOURS = {
    StepState.PENDING: GREY,
    StepState.RUNNING: AMBER,
    StepState.RETRYING: AMBER,
    StepState.COMPLETED: GREEN,
    StepState.FAILED: RED,
    SagaState.COMPENSATING: AMBER,
    SagaState.COMPENSATED: BLUE,  # undone as designed: not an error, not a success either
}


def state_badge(state: str, colours: dict[str, str] = STATE_COLOURS) -> SafeString:
    """`state` as a coloured label (unknown states are grey)."""
    return format_html(
        '<span class="state-badge" style="background:{};color:#fff;padding:1px 6px;border-radius:3px;'
        'font-weight:bold;white-space:nowrap">{}</span>',
        colours.get(state, GREY),
        state,
    )


def saga_timeline_table(saga: SagaInstance) -> SafeString:
    """The saga's timeline as a picture (sagas.timeline) over a read-only table of every step and
    compensation: times to the millisecond, duration, attempts and deliveries (lost ones in red),
    the idempotency key its external calls carry, its result and its last error. No JS."""
    executions = saga_timeline(saga)
    rows = format_html_join(
        "\n",
        '<tr class="timeline-row state-{}"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>'
        "<td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
        (
            (
                e.state.lower(),
                e.direction,
                e.name,
                state_badge(e.state),
                e.attempts,
                _deliveries(e),
                when(e.started_at),
                when(e.finished_at),
                _duration(duration_ms(e.started_at, e.finished_at)),
                f"{saga.id}:{e.name}",
                _json_brief(e.result),
                e.last_error or "-",
            )
            for e in executions
        ),
    )
    return format_html(
        '<div class="inline-group" id="saga-timeline"><div class="tabular inline-related last-related">'
        '<fieldset class="module"><h2>Saga timeline: {} {}</h2><div style="overflow-x:auto">{}</div>'
        '<div style="overflow-x:auto"><table><thead><tr>'
        "<th>Direction</th><th>Step</th><th>State</th><th>Attempts</th><th>Deliveries</th>"
        "<th>Started</th><th>Finished</th><th>Duration</th><th>Idempotency key</th><th>Result</th><th>Error</th>"
        "</tr></thead><tbody>{}</tbody></table></div></fieldset></div></div>",
        saga.name,
        state_badge(saga.state),
        saga_timeline_svg(saga, executions),
        rows,
    )


def _deliveries(execution: StepExecution) -> SafeString:
    lost = lost_deliveries(execution)
    if not lost:
        return format_html("{}", execution.deliveries)
    return format_html('{} <span style="color:{}" title="deliveries that never finished">({} lost)</span>', execution.deliveries, RED, lost)


def _duration(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.1f} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


def _json_brief(value, limit: int = 200) -> SafeString | str:
    if value is None:
        return "-"
    text = json.dumps(value, cls=DjangoJSONEncoder, sort_keys=True)
    return format_html('<code title="{}">{}</code>', text, text if len(text) <= limit else text[:limit] + "\u2026")


def when(moment) -> str:
    # Milliseconds matter in a timeline: steps of one saga often run within the same second.
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if moment else "-"


class ReadOnlyAdminMixin:
    """View-only: rows change only through services, never through an admin form. Actions stay
    available; each declares which permission it needs."""

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class HistoryAdminMixin(IndexedSearchMixin):
    """For a table that grows with the history: a page, its count, its filters and its search each
    read through an index (sagas.admin_lists), whatever the table's size. No date hierarchy (it
    reads every row's date); columns sort only where `sortable_by` says an index serves them."""

    paginator = EstimatedCountPaginator
    show_full_result_count = False  # "N total" beside the search box would count the whole table
    # Rendering a row costs about half a millisecond; the rows are read in well under one. Django's
    # 100 a page would make rendering most of the page's time.
    list_per_page = 50

    def get_changelist(self, request, **kwargs):
        return SortableByChangeList


class OperatedAdminMixin:
    """Actions with `permissions=["operate"]` need the model's Django "change" permission. The admin
    form never changes the row (has_change_permission is False); the action calls a service."""

    def has_operate_permission(self, request) -> bool:
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}")


class StuckForFilter(admin.SimpleListFilter):
    """Active sagas (PENDING, RUNNING, COMPENSATING) with no recorded progress for N minutes."""

    title = "stuck for more than"
    parameter_name = "stuck_for"
    MINUTES = (5, 15, 60)

    def lookups(self, request, model_admin):
        return [(str(minutes), f"{minutes} minutes") for minutes in self.MINUTES]

    def queryset(self, request, queryset: QuerySet[SagaInstance]) -> QuerySet[SagaInstance]:
        minutes = self.minutes()
        if minutes is None:
            return queryset
        return queryset.filter(state__in=ACTIVE_STATES, updated_at__lt=timezone.now() - timedelta(minutes=minutes))

    def minutes(self) -> int | None:
        value = self.value()
        return int(value) if value in {str(m) for m in self.MINUTES} else None


class AttentionFilter(admin.SimpleListFilter):
    """What the admin index's "needs attention" panel links to (sagas.attention)."""

    title = "needs attention"
    parameter_name = "attention"

    def lookups(self, request, model_admin):
        return [(key, item.label) for key, item in attention.SAGA_ITEMS.items()]

    def queryset(self, request, queryset: QuerySet[SagaInstance]) -> QuerySet[SagaInstance]:
        item = attention.SAGA_ITEMS.get(self.value())
        return item.sagas(queryset) if item else queryset


def saga_names() -> list[str]:
    """The names of the saga definitions this deployment registers."""
    return sorted({saga.name for saga in registered()})


@admin.register(SagaInstance)
class SagaInstanceAdmin(HistoryAdminMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["short_id", "saga", "coloured_state", "created", "age", "last_error"]
    list_display_links = ["short_id"]
    list_filter = ["state", AttentionFilter, choices_filter("name", saga_names), StuckForFilter, ("created_at", admin.DateFieldListFilter)]
    search_fields = ["id", "idempotency_key"]
    search_help_text = "A saga id (or its first characters), or an idempotency key, whole."
    ordering = ["-created_at", "-id"]  # saga_created_idx
    sortable_by = ["short_id", "created", "age"]
    change_form_template = "admin/sagas/sagainstance/change_form.html"
    fieldsets = [
        (None, {"fields": ["id", "name", "version", "coloured_state", "failure_reason", "idempotency_key"]}),
        ("Times", {"fields": ["created", "updated", "finished", "duration", "deadline", "next_check", "redrives"]}),
        ("Input", {"fields": ["input_json"]}),
    ]
    readonly_fields = [
        "id", "name", "version", "coloured_state", "failure_reason", "idempotency_key", "created", "updated", "finished",
        "duration", "deadline", "next_check", "redrives", "input_json",
    ]
    actions = ["retry_compensation", "abort"]

    @admin.display(description="state", ordering="state")
    def coloured_state(self, saga: SagaInstance) -> SafeString:
        return state_badge(saga.state)

    @admin.display(description="id", ordering="id")
    def short_id(self, saga: SagaInstance) -> SafeString:
        """The first 8 characters (the whole id in the tooltip): enough to tell sagas apart on a page."""
        return format_html('<span title="{}">{}\u2026</span>', saga.id, str(saga.id)[:8])

    @admin.display(description="saga", ordering="name")
    def saga(self, saga: SagaInstance) -> str:
        return f"{saga.name} v{saga.version}"

    @admin.display(description="age", ordering="created_at")
    def age(self, saga: SagaInstance) -> str:
        """How long it has run (or ran, when finished)."""
        return _duration(duration_ms(saga.created_at, saga.finished_at or timezone.now()))

    @admin.display(description="last error")
    def last_error(self, saga: SagaInstance) -> SafeString | str:
        reason = saga.failure_reason
        if not reason:
            return "-"
        short = reason if len(reason) <= 60 else reason[:60] + "\u2026"
        return format_html('<span title="{}" style="overflow-wrap:anywhere">{}</span>', reason, short)

    @admin.display(description="created", ordering="created_at")
    def created(self, saga: SagaInstance) -> str:
        return when(saga.created_at)

    @admin.display(description="last change")
    def updated(self, saga: SagaInstance) -> str:
        return when(saga.updated_at)

    @admin.display(description="finished")
    def finished(self, saga: SagaInstance) -> str:
        return when(saga.finished_at)

    @admin.display(description="duration")
    def duration(self, saga: SagaInstance) -> str:
        took = _duration(duration_ms(saga.created_at, saga.finished_at))
        return took if saga.finished_at else f"running for {self.age(saga)}"

    @admin.display(description="deadline")
    def deadline(self, saga: SagaInstance) -> str:
        return when(saga.deadline_at)

    @admin.display(description="sweeper looks again after")
    def next_check(self, saga: SagaInstance) -> str:
        return when(saga.stuck_after)

    @admin.display(description="input")
    def input_json(self, saga: SagaInstance) -> SafeString:
        return format_html("<pre style=\"margin:0;white-space:pre-wrap\">{}</pre>", json.dumps(saga.input, cls=DjangoJSONEncoder, indent=2, sort_keys=True))

    def get_urls(self):
        page = self.admin_site.admin_view
        return [
            path("<uuid:saga_id>/operate/<str:operation>/", page(self.operate_view), name="sagas_sagainstance_operate"),
            *super().get_urls(),
        ]

    def operations(self, request, saga: SagaInstance) -> list[tuple[str, str]]:
        """(operation, button label) that this user may run on this saga in its state."""
        offered = []
        if saga.state == SagaState.FAILED and self.has_retry_permission(request):
            offered.append(("retry", "Retry compensation"))
        if saga.state in (SagaState.PENDING, SagaState.RUNNING) and self.has_abort_permission(request):
            offered.append(("abort", "Abort (compensate what completed)"))
        if saga.state in ACTIVE_STATES and self.has_redrive_permission(request):
            offered.append(("redrive", "Re-drive (send what comes next again)"))
        return offered

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context["saga_operations"] = self.operations(request, obj)
            context["saga_timeline"] = saga_timeline_table(obj)  # below the fields, full width
        return super().render_change_form(request, context, add=add, change=change, form_url=form_url, obj=obj)

    def operate_view(self, request, saga_id, operation: str):
        """GET: a confirmation page; POST: run the operation through the engine's service, then
        back to the saga's page with what happened. 403 without the operation's permission, 404
        for an unknown saga or an operation its state does not offer."""
        saga = get_object_or_404(SagaInstance, pk=saga_id)
        if not self.has_view_permission(request, saga):
            raise PermissionDenied
        offered = dict(self.operations(request, saga))
        if operation not in offered:
            allowed = {"retry": self.has_retry_permission, "abort": self.has_abort_permission, "redrive": self.has_redrive_permission}.get(operation)
            if allowed is not None and not allowed(request):
                raise PermissionDenied
            self.message_user(request, f"saga {saga.id} is {saga.state}: {operation} is not possible now", messages.WARNING)
            return redirect("admin:sagas_sagainstance_change", saga.id)
        if request.method == "POST":
            self._operate(request, saga, operation)
            return redirect("admin:sagas_sagainstance_change", saga.id)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "saga": saga,
            "operation": operation,
            "label": offered[operation],
            "title": f"{offered[operation]}: saga {saga.id}?",
        }
        return TemplateResponse(request, "admin/sagas/sagainstance/operate_confirm.html", context)

    def _operate(self, request, saga: SagaInstance, operation: str) -> None:
        try:
            if operation == "retry":
                saga = saga_retry_compensation(saga_id=saga.id)
            elif operation == "redrive":
                saga = saga_redrive(saga_id=saga.id, by=f"{request.user.get_username()} in the admin")
            else:
                saga = saga_abort(saga_id=saga.id, reason=f"aborted by {request.user.get_username()} in the admin")
        except SagaStateConflict as exc:
            self.message_user(request, str(exc), messages.WARNING)
            return
        self.message_user(request, f"saga {saga.id}: {operation} done, now {saga.state}", messages.SUCCESS)

    def search_q(self, term: str) -> Q | None:
        # Through saga_unique_idempotency_key (name, idempotency_key): the name must be given.
        return any_of(uuid_q("id", term), Q(name__in=saga_names(), idempotency_key=term))

    # The same permissions as the staff API's (sagas.permissions).
    def has_retry_permission(self, request) -> bool:
        return request.user.has_perm(RETRY_SAGA)

    def has_abort_permission(self, request) -> bool:
        return request.user.has_perm(ABORT_SAGA)

    def has_redrive_permission(self, request) -> bool:
        return request.user.has_perm(REDRIVE_SAGA)

    @admin.action(description="Retry compensation of selected FAILED sagas", permissions=["retry"])
    def retry_compensation(self, request, queryset: QuerySet[SagaInstance]) -> None:
        for saga_id in queryset.order_by("created_at").values_list("pk", flat=True):
            try:
                saga = saga_retry_compensation(saga_id=saga_id)
            except SagaStateConflict as exc:
                self.message_user(request, str(exc), messages.WARNING)
                continue
            self.message_user(request, f"saga {saga.id}: compensation retried, now {saga.state}", messages.SUCCESS)

    @admin.action(description="Abort selected sagas (compensate what they completed)", permissions=["abort"])
    def abort(self, request, queryset: QuerySet[SagaInstance]) -> None:
        for saga_id, before in queryset.order_by("created_at").values_list("pk", "state"):
            try:
                saga = saga_abort(saga_id=saga_id, reason=f"aborted by {request.user.get_username()} in the admin")
            except SagaStateConflict as exc:
                self.message_user(request, str(exc), messages.WARNING)
                continue
            if before in (SagaState.PENDING, SagaState.RUNNING):
                self.message_user(request, f"saga {saga.id}: aborted, now {saga.state}", messages.SUCCESS)
            else:
                self.message_user(request, f"saga {saga.id} was already {before}: left unchanged", messages.INFO)


@admin.register(Fault)
class FaultAdmin(admin.ModelAdmin):
    list_display = ["saga_name", "step", "direction", "kind", "remaining", "created_at"]


class OutboxStateFilter(admin.SimpleListFilter):
    title = "delivery"
    parameter_name = "delivery"

    def lookups(self, request, model_admin):
        return [("waiting", "waiting to publish"), ("dead", "dead letter"), ("published", "published")]

    def queryset(self, request, queryset):
        if self.value() == "waiting":
            return queryset.filter(published_at__isnull=True, dead_lettered_at__isnull=True)
        if self.value() == "dead":
            return queryset.filter(published_at__isnull=True, dead_lettered_at__isnull=False)
        if self.value() == "published":
            return queryset.filter(published_at__isnull=False)
        return queryset


def aggregate_types() -> list[str]:
    """Every aggregate type in the outbox, found through outbox_aggregate_idx (one probe each)."""
    return distinct_values(OutboxEvent.objects.all(), "aggregate_type")


def recent_event_types() -> list[str]:
    """The event types among the newest events: what flows now (no index leads with the type)."""
    return recent_values(OutboxEvent.objects.all(), "event_type")


@admin.register(OutboxEvent)
class OutboxEventAdmin(HistoryAdminMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["sequence", "event_type", "aggregate_type", "aggregate_id", "created_at", "published_at", "attempts", "dead_lettered_at"]
    list_filter = [OutboxStateFilter, choices_filter("aggregate_type", aggregate_types), choices_filter("event_type", recent_event_types)]
    search_fields = ["sequence", "id", "aggregate_id"]
    search_help_text = "An event's sequence number or id (or its first characters), or an aggregate id, whole."
    sortable_by = ["sequence"]
    actions = ["replay"]

    def search_q(self, term: str) -> Q | None:
        # Through outbox_aggregate_idx (aggregate_type, aggregate_id, ...): the types must be given.
        return any_of(number_q("sequence", term), uuid_q("id", term), Q(aggregate_type__in=aggregate_types(), aggregate_id=term))

    def changelist_view(self, request, extra_context=None):
        extra_context = {**(extra_context or {}), "title": _outbox_title()}
        return super().changelist_view(request, extra_context)

    def has_replay_permission(self, request) -> bool:
        return request.user.has_perm(REPLAY_OUTBOX_EVENT)

    @admin.action(description="Replay from the dead letter", permissions=["replay"])
    def replay(self, request, queryset: QuerySet[OutboxEvent]) -> None:
        replayed = outbox_replay(event_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"{replayed} event(s) replayed; {queryset.count() - replayed} were not dead-lettered.")


def inbox_consumers() -> list[str]:
    """Every consumer with inbox rows, found through inbox_once_per_consumer (one probe each)."""
    return distinct_values(InboxMessage.objects.all(), "consumer")


def subscribed_event_types() -> list[str]:
    """The event types the registered consumers take: the only ones an inbox row can be of."""
    return sorted({event_type for sub in subscriptions() for event_type in sub.events})


@admin.register(InboxMessage)
class InboxMessageAdmin(HistoryAdminMixin, ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ["consumer", "event_type", "event_id", "received_at"]
    list_filter = [choices_filter("consumer", inbox_consumers), choices_filter("event_type", subscribed_event_types)]
    search_fields = ["event_id"]
    search_help_text = "An event id (or its first characters)."
    ordering = ["-id"]  # in the order received, through the primary key (no index on received_at)
    sortable_by = []

    def search_q(self, term: str) -> Q | None:
        # Through inbox_once_per_consumer (consumer, event_id): the consumers must be given.
        by_event = uuid_q("event_id", term)
        return by_event & Q(consumer__in=inbox_consumers()) if by_event is not None else None


@admin.register(RejectedMessage)
class RejectedMessageAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Messages workers refused (undecodable, unknown, arguments that do not fit): kept for a look."""

    list_display = ["received_at", "queue", "task", "reason"]
    list_filter = ["queue", "task"]
    search_fields = ["reason", "body"]


@admin.register(ParkedDelivery)
class ParkedDeliveryAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Events a consumer gave up on: parked once and settled; replay sends one again."""

    list_display = ["parked_at", "consumer", "event_type", "aggregate_id", "settled", "reason"]
    list_filter = ["consumer", "event_type", "settled"]
    search_fields = ["event_id", "aggregate_id", "reason"]
    actions = ["replay"]

    def has_replay_permission(self, request) -> bool:
        return request.user.has_perm(REPLAY_PARKED_DELIVERY)

    @admin.action(description="Replay to the consumer", permissions=["replay"])
    def replay(self, request, queryset: QuerySet[ParkedDelivery]) -> None:
        for parked in queryset:
            try:
                consumer_replay(parked=parked)
                self.message_user(request, f"{parked.consumer}: {parked.event_type} {parked.event_id} sent again")
            except OutboxEvent.DoesNotExist:
                self.message_user(request, f"{parked.event_id}: no longer retained; not replayed", level=messages.WARNING)


@admin.register(WorkerHeartbeat)
class WorkerHeartbeatAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """The celery workers that beat recently, what they hold and when they last took work."""

    list_display = ["hostname", "queues", "beat_at", "active", "accepted", "progress_at", "started_at"]


def _outbox_title() -> str:
    stats = outbox_stats(now=timezone.now())
    return (
        f"Outbox: {stats['backlog']} waiting (oldest {stats['oldest_unpublished_age_s']}s), "
        f"{stats['published_per_s']}/s published, {stats['dead_lettered']} dead-lettered"
    )
