"""Interceptors: behaviour that wraps a step delivery without living in the runner's own path
(after Temporal's ActivityInboundInterceptor). The runner calls each configured interceptor at
three points; an interceptor overrides the ones it needs. With none configured (production
without fault injection) the runner calls nothing.

Two are built in: metrics (sagas.metrics, on unless SAGAS_METRICS is off) and fault injection
(sagas.faults); tracing would plug in the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.conf import settings

if TYPE_CHECKING:
    from sagas.runner import Delivery, StepResult


class Interceptor:
    def delivered(self, delivery: Delivery) -> None:
        """A step message arrived, before anything is read or counted."""

    def call(self, delivery: Delivery, action: Callable[[], Any]) -> Any:
        """Around the action, inside the step's transaction: return what `action()` returns."""
        return action()

    def finished(self, delivery: Delivery, result: StepResult) -> None:
        """After the step's transaction committed (or decided not to run the step)."""


def configured() -> tuple[Interceptor, ...]:
    """The interceptors of this process, read per delivery (a test may switch fault injection)."""
    chosen: list[Interceptor] = []
    if settings.SAGAS_METRICS:
        from sagas.metrics import Metrics

        chosen.append(Metrics())
    if settings.SAGAS_FAULT_INJECTION:
        from sagas.faults import FaultInjection

        chosen.append(FaultInjection())
    return tuple(chosen)
