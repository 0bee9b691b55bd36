"""Row locks of the saga log. Every code path takes the saga row first, then step rows in primary
key order, so two paths can never deadlock each other. Must run inside transaction.atomic."""

from uuid import UUID

from sagas.exceptions import SagaNotFound
from sagas.models import SagaInstance, StepExecution


def lock_saga(saga_id: UUID | str) -> SagaInstance:
    try:
        return SagaInstance.objects.select_for_update().get(pk=saga_id)
    except SagaInstance.DoesNotExist:
        raise SagaNotFound(f"saga {saga_id} does not exist") from None


def lock_step(saga: SagaInstance, name: str, direction: str) -> StepExecution | None:
    """The step row, or None when the saga log has none (a compensation exists only for a step
    that took effect); the caller holds the saga row lock already."""
    return StepExecution.objects.select_for_update().filter(saga=saga, name=name, direction=direction).first()


def lock_steps(saga: SagaInstance, direction: str) -> list[StepExecution]:
    """All of a saga's step rows of one direction, locked in primary key order."""
    return list(StepExecution.objects.select_for_update().filter(saga=saga, direction=direction).order_by("pk"))
