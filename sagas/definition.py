"""Saga definitions: a named, versioned, ordered list of steps, each with an action, an optional
compensation, a retry policy and a timeout.

A definition is data plus plain functions. The engine runs each step as one message of the
`sagas.run_step` task, inside a database transaction that also records the step's outcome, so a
step's writes and its COMPLETED mark commit together (DESIGN.md rule 2).

    place_order = Saga("place_order", version=1, steps=[
        Step("create_order", action=order_create, compensation=order_cancel),
        Step("charge", action=payment_charge, compensation=payment_refund, timeout=timedelta(seconds=20),
             retry=Retry(max_attempts=5, initial_delay=timedelta(seconds=1), non_retryable=(PaymentDeclined,))),
    ])

Durations (a step's timeout, a retry's delays, a saga's deadline) are `timedelta`s; a number is
taken as seconds. A definition that breaks a rule is refused when it is created, with an error
naming the saga and the step.
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

from sagas.exceptions import BusinessError, InvalidSagaDefinition, InvalidStepResult, UnknownSagaDefinition

# After the soft time limit (the step's timeout) raises inside the action, the hard limit kills
# the worker child if the action ignores it.
HARD_LIMIT_GRACE = 5.0

FORWARD = "forward"
COMPENSATE = "compensate"

Duration = timedelta | float | int  # a number is seconds


def seconds(value: Duration, what: str) -> float:
    """`value` in seconds; InvalidSagaDefinition (naming `what`) unless a non-negative duration."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise InvalidSagaDefinition(f"{what} must be a timedelta or a number of seconds, not negative: got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Failure:
    """Why a saga is being undone. `reason`: the saga's failure reason, for staff (exception type,
    message and where it was raised, or why it was stopped); `step`: the forward step that failed,
    if one did; `refusal`: that step's business refusal in its own words (fit for a customer), if
    it was one."""

    reason: str
    step: str | None = None
    refusal: str = ""


@dataclass(frozen=True)
class Outcome:
    """What a saga's on_finish hook gets: how it ended (COMPLETED, COMPENSATED or FAILED), and why
    when it was undone."""

    saga_id: UUID
    saga_name: str
    version: int
    state: str
    input: Mapping[str, Any]
    finished_at: datetime | None
    failure: Failure | None = None


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
    # In a compensation: why the saga is being undone. None in a forward step.
    reason: Failure | None = None

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
    """Retry policy: the first retry after `initial_delay`, each next one after twice the delay
    before it, never more than `max_delay` (with jitter: a random delay between half of that and
    all of it). Delays are timedeltas or seconds; read back, they are seconds.

    `max_attempts` counts every try, the first included. `BusinessError` subclasses and the
    types in `non_retryable` fail the step at once.
    """

    max_attempts: int = 3
    initial_delay: Duration = 1.0
    max_delay: Duration = 60.0
    jitter: bool = True
    non_retryable: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise InvalidSagaDefinition(f"Retry.max_attempts must be a whole number of at least 1, not {self.max_attempts!r}")
        object.__setattr__(self, "initial_delay", seconds(self.initial_delay, "Retry.initial_delay"))
        object.__setattr__(self, "max_delay", seconds(self.max_delay, "Retry.max_delay"))
        non_retryable = tuple(self.non_retryable) if isinstance(self.non_retryable, (list, tuple)) else (self.non_retryable,)
        if not all(isinstance(t, type) and issubclass(t, BaseException) for t in non_retryable):
            raise InvalidSagaDefinition(f"Retry.non_retryable must be exception classes, not {self.non_retryable!r}")
        object.__setattr__(self, "non_retryable", non_retryable)

    def describe(self) -> dict:
        """The policy as plain data (for the definition's fingerprint). The first delay keeps its
        earlier name, "backoff", so that fingerprints recorded before the rename still match."""
        return {
            "max_attempts": self.max_attempts,
            "backoff": self.initial_delay,
            "max_delay": self.max_delay,
            "jitter": self.jitter,
            "non_retryable": sorted(_callable_name(t) for t in self.non_retryable),
        }

    def is_retryable(self, exc: BaseException) -> bool:
        return not isinstance(exc, (BusinessError, InvalidStepResult, *self.non_retryable))

    def delay(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """Seconds to wait before try number `attempt + 1`, after `attempt` failed tries."""
        ceiling = min(self.max_delay, self.initial_delay * (2 ** (attempt - 1)))
        if not self.jitter:
            return ceiling
        return (rng or random).uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class Step:
    """One step. `timeout` (a timedelta, or seconds; read back, seconds) bounds one try: Celery's
    soft limit, then a hard kill.

    `max_deliveries` is how many times the step may be delivered without ever finishing (its
    worker was killed each time) before it is failed and compensated instead of looping.
    """

    name: str
    action: Action
    compensation: Action | None = None
    retry: Retry = field(default_factory=Retry)
    compensation_retry: Retry = field(default_factory=lambda: Retry(max_attempts=5, max_delay=30.0))
    timeout: Duration = 30.0
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

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidSagaDefinition(f"a step's name must be a non-empty string, not {self.name!r}")
        object.__setattr__(self, "timeout", seconds(self.timeout, f"step {self.name}: timeout"))

    def problems(self) -> list[str]:
        """What is wrong with this step, each in a few words (Saga names the saga in the error)."""
        found = []
        for role in ("action", "compensation", "on_failure"):
            value = getattr(self, role)
            if (value is not None or role == "action") and not callable(value):
                found.append(f"{role} must be a function taking the step context, not {value!r}")
        for role in ("retry", "compensation_retry"):
            if not isinstance(getattr(self, role), Retry):
                found.append(f"{role} must be a Retry, not {getattr(self, role)!r}")
        if self.timeout <= 0:
            found.append("timeout must be positive")
        if isinstance(self.max_deliveries, bool) or not isinstance(self.max_deliveries, int) or self.max_deliveries < 1:
            found.append(f"max_deliveries must be a whole number of at least 1, not {self.max_deliveries!r}")
        if self.compensate_uncertain and self.compensation is None:
            found.append("compensate_uncertain needs a compensation")
        return found

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
        deadline: Duration | None = None,
        on_finish: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.name = name
        self.version = version
        self.steps = tuple(steps)
        self.compensate_in_parallel = compensate_in_parallel
        self.continue_on_compensation_failure = continue_on_compensation_failure
        self.deadline = timedelta(seconds=seconds(deadline, f"saga {name}: deadline")) if deadline is not None else None
        # Called with an Outcome when the saga reaches COMPLETED, COMPENSATED or FAILED, inside
        # the transaction that records that state; must be idempotent.
        self.on_finish = on_finish
        self._by_name = {step.name: step for step in self.steps if isinstance(step, Step)}
        self._validate()
        _register(self)

    def __repr__(self) -> str:
        return f"<Saga {self.name} v{self.version}: {', '.join(self._by_name)}>"

    def _validate(self) -> None:
        from django.conf import settings

        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidSagaDefinition(f"a saga's name must be a non-empty string, not {self.name!r}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise InvalidSagaDefinition(f"saga {self.name}: version must be a whole number of at least 1, not {self.version!r}")
        if not self.steps:
            raise InvalidSagaDefinition(f"saga {self.name} has no steps")
        not_steps = [s for s in self.steps if not isinstance(s, Step)]
        if not_steps:
            raise InvalidSagaDefinition(f"saga {self.name}: steps must be Step(...), not {not_steps[0]!r}")
        names = [step.name for step in self.steps]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InvalidSagaDefinition(f"saga {self.name} has more than one step named {', '.join(repeated)}")
        if self.on_finish is not None and not callable(self.on_finish):
            raise InvalidSagaDefinition(f"saga {self.name}: on_finish must be a function taking an Outcome, not {self.on_finish!r}")
        visibility = settings.SAGAS_VISIBILITY_TIMEOUT
        for step in self.steps:
            problems = step.problems()
            if problems:
                raise InvalidSagaDefinition(f"saga {self.name}, step {step.name}: {'; '.join(problems)}")
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
