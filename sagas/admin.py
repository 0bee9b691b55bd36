"""Read-only admin for the saga log: the log is written only by the engine."""

from django.contrib import admin

from sagas.models import Fault, SagaInstance, StepExecution


class StepExecutionInline(admin.TabularInline):
    model = StepExecution
    extra = 0
    can_delete = False
    ordering = ["started_at", "direction", "position"]
    fields = ["direction", "name", "state", "attempts", "deliveries", "started_at", "finished_at", "last_error"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(SagaInstance)
class SagaInstanceAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "version", "state", "created_at", "updated_at", "redrives"]
    list_filter = ["state", "name"]
    search_fields = ["id", "idempotency_key"]
    date_hierarchy = "created_at"
    inlines = [StepExecutionInline]
    readonly_fields = [f.name for f in SagaInstance._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Fault)
class FaultAdmin(admin.ModelAdmin):
    list_display = ["saga_name", "step", "direction", "kind", "remaining", "created_at"]
