from sagas.models import SagaInstance, StepExecution


def saga_timeline(saga: SagaInstance) -> list[StepExecution]:
    """Every step and compensation of the saga in the order they started; not started yet: last.
    Uses a prefetched `steps` when the caller prefetched it."""
    return sorted(saga.steps.all(), key=lambda e: (e.started_at is None, e.started_at, e.direction, e.position))
