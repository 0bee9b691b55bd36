"""Saga definitions: a named, versioned, ordered list of steps, each with an action, an optional
compensation, a retry policy and a timeout.

A definition is data plus plain functions. The engine runs each step as one message of the
`sagas.run_step` task, inside a database transaction that also records the step's outcome, so a
step's writes and its COMPLETED mark commit together (DESIGN.md rule 2).

    place_order = Saga("place_order", version=1, steps=[
        Step("create_order", action=order_create, compensation=order_cancel),
        Step("charge", action=payment_charge, compensation=payment_refund,
             retry=Retry(max_attempts=5, non_retryable=(PaymentDeclined,))),
    ])
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any
from uuid import UUID

from sagas.exceptions import BusinessError, InvalidSagaDefinition, UnknownSagaDefinition

# After the soft time limit (the step's timeout) raises inside the action, the hard limit kills
# the worker child if the action ignores it.
HARD_LIMIT_GRACE = 5.0

FORWARD = "forward"
COMPENSATE = "compensate"


@dataclass(frozen=True)
class StepContext:
    """What an action or compensation gets: the saga's input and the results of earlier steps.

    `idempotency_key` is `<saga id>:<step name>`, the same for every delivery and for the step's
    compensation, so an external call (charge) and its undo (refund) can both be keyed by it.
    """

    saga_id: UUID
    saga_name: str
    step: str
    direction: str
    input: Mapping[str, Any]
    results: Mapping[str, Any]
    attempt: int
    now: datetime

    @property
    def idempotency_key(self) -> str:
        return f"{self.saga_id}:{self.step}"

    @property
    def result(self) -> Any:
        """This step's own forward result (useful in a compensation)."""
        return self.results.get(self.step)


Action = Callable[[StepContext], Any]


@dataclass(frozen=True)
class Retry:
    """Retry policy: exponential backoff with full jitter, capped at `max_delay` seconds.

    `max_attempts` counts every try, the first included. `BusinessError` subclasses and the
    types in `non_retryable` fail the step at once.
    """

    max_attempts: int = 3
    backoff: float = 1.0
    max_delay: float = 60.0
    jitter: bool = True
    non_retryable: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidSagaDefinition("Retry.max_attempts must be at least 1")
        if self.backoff < 0 or self.max_delay < 0:
            raise InvalidSagaDefinition("Retry.backoff and Retry.max_delay must not be negative")

    def describe(self) -> dict:
        """The policy as plain data (for the definition's fingerprint)."""
        return {
            "max_attempts": self.max_attempts,
            "backoff": self.backoff,
            "max_delay": self.max_delay,
            "jitter": self.jitter,
            "non_retryable": sorted(_callable_name(t) for t in self.non_retryable),
        }

    def is_retryable(self, exc: BaseException) -> bool:
        return not isinstance(exc, (BusinessError, *self.non_retryable))

    def delay(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """Seconds to wait before try number `attempt + 1`, after `attempt` failed tries."""
        ceiling = min(self.max_delay, self.backoff * (2 ** (attempt - 1)))
        if not self.jitter:
            return ceiling
        return (rng or random).uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class Step:
    """One step. `timeout` (seconds) bounds one try: Celery's soft limit, then a hard kill.

    `max_deliveries` is how many times the step may be delivered without ever finishing (its
    worker was killed each time) before it is failed and compensated instead of looping.
    """

    name: str
    action: Action
    compensation: Action | None = None
    retry: Retry = field(default_factory=Retry)
    compensation_retry: Retry = field(default_factory=lambda: Retry(max_attempts=5, max_delay=30.0))
    timeout: float = 30.0
    max_deliveries: int = 3
    queue: str | None = None
    # Called as on_failure(context, error) when the action fails for good, in the transaction that
    # records the failure (the action's own writes are rolled back): e.g. emit a PAYMENT_FAILED event.
    on_failure: Callable[[StepContext, BaseException], None] | None = None
    # Also compensate this step when it FAILED with an uncertain outcome (not a business refusal):
    # for external calls such as a charge whose response was lost on every try. Its compensation
    # must find out by the idempotency key whether the effect happened.
    compensate_uncertain: bool = False
    # The action (and compensation) runs inside the step's transaction, and atomic blocks nested
    # in it make no savepoint: if anything inside raises, the whole step rolls back anyway, and
    # each savepoint costs two round trips. An action that catches a database error from a nested
    # atomic block and goes on needs its savepoints back: set this. (Not in the fingerprint: it
    # does not change what a saga in flight does.)
    savepoints: bool = False

    def describe(self) -> dict:
        """The step as plain data: what decides how a saga in flight goes on (for the fingerprint)."""
        return {
            "name": self.name,
            "action": _callable_name(self.action),
            "compensation": _callable_name(self.compensation),
            "retry": self.retry.describe(),
            "compensation_retry": self.compensation_retry.describe(),
            "timeout": self.timeout,
            "max_deliveries": self.max_deliveries,
            "queue": self.queue,
            "on_failure": _callable_name(self.on_failure),
            "compensate_uncertain": self.compensate_uncertain,
        }

    def policy(self, direction: str) -> Retry:
        return self.retry if direction == FORWARD else self.compensation_retry

    def function(self, direction: str) -> Action | None:
        return self.action if direction == FORWARD else self.compensation


_registry: dict[tuple[str, int], Saga] = {}


class Saga:
    """A named, versioned business process. Creating one registers it, so a worker that imports
    the module can finish any saga started with that name and version."""

    def __init__(
        self,
        name: str,
        *,
        version: int,
        steps: list[Step],
        compensate_in_parallel: bool = False,
        continue_on_compensation_failure: bool = False,
        deadline: timedelta | None = None,
        on_finish: Callable[[Any], None] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.steps = tuple(steps)
        self.compensate_in_parallel = compensate_in_parallel
        self.continue_on_compensation_failure = continue_on_compensation_failure
        self.deadline = deadline
        # Called with the SagaInstance when it reaches COMPLETED, COMPENSATED or FAILED, inside
        # the transaction that records that state; must be idempotent.
        self.on_finish = on_finish
        self._by_name = {step.name: step for step in self.steps}
        self._validate()
        _register(self)

    def __repr__(self) -> str:
        return f"<Saga {self.name} v{self.version}: {', '.join(self._by_name)}>"

    def _validate(self) -> None:
        from django.conf import settings

        if not self.steps:
            raise InvalidSagaDefinition(f"saga {self.name} has no steps")
        if len(self._by_name) != len(self.steps):
            raise InvalidSagaDefinition(f"saga {self.name} repeats a step name")
        visibility = settings.SAGAS_VISIBILITY_TIMEOUT
        for step in self.steps:
            if step.timeout <= 0 or step.max_deliveries < 1:
                raise InvalidSagaDefinition(f"{self.name}.{step.name}: timeout and max_deliveries must be positive")
            longest = step.timeout + HARD_LIMIT_GRACE + max(step.retry.max_delay, step.compensation_retry.max_delay)
            if longest >= visibility:
                # A message held longer than the visibility timeout is delivered again while the
                # first delivery is still running or waiting for its retry.
                raise InvalidSagaDefinition(
                    f"{self.name}.{step.name}: timeout + largest retry delay ({longest:g}s) must stay "
                    f"below the broker visibility timeout ({visibility}s, SAGAS_VISIBILITY_TIMEOUT)"
                )

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of everything that decides how a saga in flight goes on: the steps in order with
        their actions, compensations, hooks and policies, and the saga's own options. Recorded on
        each saga when it starts; a deploy whose definition of a version differs from the one its
        sagas in flight started with is refused (sagas.checks)."""
        described = {  # not the name and version: each saga records those beside the fingerprint
            "steps": [step.describe() for step in self.steps],
            "compensate_in_parallel": self.compensate_in_parallel,
            "continue_on_compensation_failure": self.continue_on_compensation_failure,
            "deadline": self.deadline.total_seconds() if self.deadline is not None else None,
            "on_finish": _callable_name(self.on_finish),
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def step(self, name: str) -> Step:
        try:
            return self._by_name[name]
        except KeyError:
            raise InvalidSagaDefinition(f"saga {self.name} v{self.version} has no step {name!r}") from None

    def position(self, name: str) -> int:
        return self.steps.index(self.step(name))

    def start(self, *, input: Mapping[str, Any] | None = None, idempotency_key: str | None = None):
        """Start this saga (see `sagas.services.saga_start`)."""
        from sagas.services import saga_start

        return saga_start(definition=self, input=input or {}, idempotency_key=idempotency_key)


def _callable_name(value) -> str | None:
    """`module.qualname` of a function or class: stable across processes and restarts."""
    if value is None:
        return None
    qualname = getattr(value, "__qualname__", None) or type(value).__qualname__
    return f"{getattr(value, '__module__', None) or type(value).__module__}.{qualname}"


def _register(saga: Saga) -> None:
    key = (saga.name, saga.version)
    existing = _registry.get(key)
    if existing is not None and [s.name for s in existing.steps] != [s.name for s in saga.steps]:
        raise InvalidSagaDefinition(
            f"saga {saga.name} v{saga.version} is already registered with other steps; bump the version"
        )
    _registry[key] = saga


def get_definition(name: str, version: int) -> Saga:
    """The definition a saga started with. Raises UnknownSagaDefinition."""
    try:
        return _registry[(name, version)]
    except KeyError:
        raise UnknownSagaDefinition(
            f"no saga definition {name} v{version} is registered in this process "
            f"(is the module that defines it imported by the worker?)"
        ) from None


def registered() -> list[Saga]:
    return list(_registry.values())
