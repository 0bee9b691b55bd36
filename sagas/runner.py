"""Running one step (or compensation) of a saga, and handling its final failure.

A step runs in two transactions:
  1. record the delivery (committed before any work, so a worker killed mid-step leaves a count
     behind; too many deliveries that never finished fail the step instead of looping). Usually
     one UPDATE of the step row; a step that is not plainly runnable takes the locked path;
  2. under the saga and step row locks: skip if the log says COMPLETED, else run the action and
     record its outcome. The action's writes and the COMPLETED mark commit together; if the action
     raises, the transaction rolls back whole and a third one records the failure or the retry.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import signal
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import DateTimeField, Exists, F, OuterRef, Value
from django.db.models.functions import Coalesce
from django.utils import timezone

from sagas.definition import FORWARD, HARD_LIMIT_GRACE, Saga, Step, StepContext, get_definition
from sagas.exceptions import BusinessError, SagaNotFound, StepFailedEarlier, WorkerLostTooOften
from sagas.faults import InjectedBusinessError, InjectedTransientError, fault_take
from sagas.locks import lock_saga, lock_step
from sagas.log import transition
from sagas.models import FaultKind, SagaInstance, SagaState, StepExecution, StepState
from sagas.services import (
    RUNS_FORWARD,
    UNFINISHED_STEP,
    saga_advance,
    saga_begin_compensation,
    saga_finish,
    saga_finish_compensation_if_done,
    saga_touch,
)
from sagas.waits import is_infrastructure_error, limit_step_transaction

log = logging.getLogger("sagas")


class Outcome(enum.Enum):
    DONE = "done"  # completed now or earlier: the saga moves on
    RETRY = "retry"  # a transient failure; try again after `countdown`
    FAILED = "failed"  # final failure: raise `error` so the errback runs
    STALE = "stale"  # the saga no longer runs this direction: drop the message


@dataclass(frozen=True)
class StepResult:
    outcome: Outcome
    countdown: float = 0.0
    error: BaseException | None = None


def step_run(
    *,
    saga_id: UUID | str,
    step_name: str,
    direction: str,
    republish: Callable[[], None],
    now: Callable[[], datetime] = timezone.now,
) -> StepResult:
    """Run one delivery of a step or compensation. Never raises the action's exception: the
    outcome says what the task must do. Raises SagaNotFound."""
    faults = _faults(saga_id, step_name, direction)
    if FaultKind.DUPLICATE in faults:
        republish()

    early = _deliver(saga_id, step_name, direction, now=now())
    if early is not None:
        return early
    if FaultKind.CRASH in faults:
        _die(saga_id, step_name, "before commit")
    try:
        result = _execute(saga_id, step_name, direction, faults=faults, clock=now)
    except (OperationalError, InterfaceError) as exc:
        _release_delivery(saga_id, step_name, direction)  # the task retries this delivery
        log.warning(
            "saga_step_infrastructure_error saga=%s step=%s direction=%s: %s (retried; no attempt or delivery spent)",
            saga_id, step_name, direction, _first_line(exc),
        )
        raise
    if FaultKind.CRASH_AFTER_COMMIT in faults and result.outcome == Outcome.DONE:
        _die(saga_id, step_name, "after commit")
    return result


def step_failure_handle(*, saga_id: UUID | str, step_name: str, direction: str, failed_task_id: str) -> None:
    """The errback: a step's task failed for good. Decide from the saga log what follows."""
    now = timezone.now()
    with transaction.atomic():
        saga = lock_saga(saga_id)
        definition = get_definition(saga.name, saga.version)
        execution = lock_step(saga, step_name, direction)
        if execution is None:
            log.warning("saga_errback_dropped saga=%s step=%s direction=%s: the saga log has no such step", saga.id, step_name, direction)
            return
        if execution.state == StepState.COMPLETED:
            # The step committed and its task failed afterwards (e.g. the hard time limit hit right
            # after the commit): the log says it is done, so the saga moves on.
            saga_advance(saga, definition, now=now)
            return
        if execution.state != StepState.FAILED:
            step = definition.step(step_name)
            if _runs(saga, direction) and execution.deliveries - execution.attempts < step.max_deliveries:
                # No outcome was recorded, so this failure is a lost delivery, not the step's: Celery
                # sends the errback at the hard time limit although it also requeues the message
                # (acks_on_timeout=False), and a redelivered errback may predate an operator retry.
                # The requeued message, or the sweeper, runs the step again; _record_delivery fails
                # it once max_deliveries deliveries never finished.
                log.warning(
                    "saga_errback_without_outcome saga=%s step=%s direction=%s task=%s state=%s: left to redelivery",
                    saga.id, step_name, direction, failed_task_id, execution.state,
                )
                saga_touch(saga, now=now, expect_within=step.timeout + HARD_LIMIT_GRACE)
                saga.save(update_fields=["updated_at", "stuck_after"])
                return
            _mark(
                saga,
                execution,
                StepState.FAILED,
                now=now,
                error=execution.last_error
                or f"task {failed_task_id} failed without recording an outcome (time limit or crash)",
            )
            execution.outcome_uncertain = True
            execution.save()
        if direction == FORWARD:
            if saga.state in RUNS_FORWARD:
                reason = f"step {step_name} failed: {execution.last_error}"
                saga_begin_compensation(saga, definition, reason=reason, now=now)
            elif saga.state == SagaState.COMPENSATING:
                saga_advance(saga, definition, now=now)  # a redelivered errback: re-send, harmless
            return
        if saga.state != SagaState.COMPENSATING:
            return
        if definition.compensate_in_parallel:
            saga_finish_compensation_if_done(saga, now=now)
        else:
            saga_advance(saga, definition, now=now)


def _runs(saga: SagaInstance, direction: str) -> bool:
    return saga.state in RUNS_FORWARD if direction == FORWARD else saga.state == SagaState.COMPENSATING


def _faults(saga_id, step_name: str, direction: str) -> frozenset[str]:
    if not settings.SAGAS_FAULT_INJECTION:
        return frozenset()
    try:
        saga = SagaInstance.objects.get(pk=saga_id)
    except SagaInstance.DoesNotExist:
        raise SagaNotFound(f"saga {saga_id} does not exist") from None
    return fault_take(saga=saga, step=step_name, direction=direction)


def _deliver(saga_id, step_name: str, direction: str, *, now: datetime) -> StepResult | None:
    """Transaction 1: record this delivery before any work. Returns an early result, or None to
    go on and run the step."""
    if _count_delivery(saga_id, step_name, direction, now=now):
        return None
    return _record_delivery(saga_id, step_name, direction, now=now)


def _count_delivery(saga_id, step_name: str, direction: str, *, now: datetime) -> bool:
    """Transaction 1, the common case in one statement: count the delivery of a step that its
    saga runs now, that has no outcome yet and no earlier delivery that died unfinished, and show
    it RUNNING. False when that is not so (done, failed, stale, unknown saga, a delivery lost
    before): _record_delivery then decides under the locks, the delivery budget included.

    Taking no saga lock here is safe: the single UPDATE holds only the step row, and only for the
    statement, so it cannot take part in a deadlock; transaction 2 checks everything again under
    both locks before running anything."""
    if direction != FORWARD:
        return False  # compensations are rare: their turn is checked under the locks
    # The step's own state must be tested on the row itself, not through a join (which Django
    # turns into `id IN (subquery)`): a delivery that waited for the row lock while another
    # completed the step must see COMPLETED on the row as committed, and not match.
    counted = StepExecution.objects.filter(
        Exists(SagaInstance.objects.filter(pk=OuterRef("saga_id"), state__in=RUNS_FORWARD)),
        ~Exists(_earlier_unfinished_forward()),  # its turn: every earlier step COMPLETED (rule 13)
        saga_id=saga_id,
        name=step_name,
        direction=direction,
        state__in=(StepState.PENDING, StepState.RUNNING, StepState.RETRYING),
        deliveries=F("attempts"),  # no earlier delivery died unfinished: no budget to check
    ).update(
        deliveries=F("deliveries") + 1,
        state=StepState.RUNNING,
        started_at=Coalesce(F("started_at"), Value(now, output_field=DateTimeField())),
    )
    return counted == 1


def _earlier_unfinished_forward():
    return StepExecution.objects.filter(
        saga_id=OuterRef("saga_id"), direction=FORWARD, position__lt=OuterRef("position")
    ).exclude(state=StepState.COMPLETED)


def _record_delivery(saga_id, step_name: str, direction: str, *, now: datetime) -> StepResult | None:
    """Transaction 1 under the saga and step locks. Returns an early result, or None to go on and
    run the step."""
    with transaction.atomic():
        admitted = _lock_and_admit(saga_id, step_name, direction, now=now, counting=True)
        if isinstance(admitted, StepResult):
            return admitted
        saga, _, _, execution = admitted
        _mark(saga, execution, StepState.RUNNING, now=now)
        execution.save()
    return None


def _admit(saga: SagaInstance, definition: Saga, execution: StepExecution, direction: str, *, now: datetime) -> StepResult | None:
    """Whether this delivery (counted already) may run the step: not after a recorded failure,
    past the saga's deadline, or once too many deliveries never finished. Under the locks."""
    if execution.state == StepState.FAILED:
        return StepResult(Outcome.FAILED, error=StepFailedEarlier(execution.last_error))
    if direction == FORWARD and saga.deadline_at is not None and now >= saga.deadline_at:
        # The sweeper may not get the saga's lock while steps keep it busy; every step checks.
        saga_begin_compensation(saga, definition, reason="deadline exceeded", now=now)
        return StepResult(Outcome.STALE)
    step = definition.step(execution.name)
    unfinished = execution.deliveries - 1 - execution.attempts  # earlier deliveries without an outcome
    if unfinished >= step.max_deliveries:
        failure = WorkerLostTooOften(
            f"delivered {execution.deliveries} times; {unfinished} deliveries never finished "
            "(worker lost or hard time limit)"
        )
        _mark(saga, execution, StepState.FAILED, now=now, error=str(failure))
        execution.outcome_uncertain = True
        execution.save()
        return StepResult(Outcome.FAILED, error=failure)
    if unfinished:
        log.warning(
            "saga_step_lost_delivery saga=%s step=%s direction=%s unfinished=%s", saga.id, step.name, direction, unfinished
        )
    return None


def _release_delivery(saga_id, step_name: str, direction: str) -> None:
    """Uncount a delivery that a database error interrupted before it recorded an outcome. Best
    effort: if the database is still unreachable the delivery stays counted as lost."""
    try:
        if not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()  # reconnect if the error broke the connection
        with transaction.atomic():
            saga = lock_saga(saga_id)
            execution = lock_step(saga, step_name, direction)
            if execution is not None and execution.state == StepState.RUNNING and execution.deliveries > execution.attempts:
                execution.deliveries -= 1
                execution.save(update_fields=["deliveries"])
    except (OperationalError, InterfaceError):
        log.warning("saga_delivery_not_released saga=%s step=%s direction=%s", saga_id, step_name, direction)


def _execute(saga_id, step_name: str, direction: str, *, faults: frozenset[str], clock: Callable[[], datetime]) -> StepResult:
    """Transaction 2: run the action and record its outcome, or find it already done. The action
    runs in this transaction without a savepoint of its own (two round trips per step saved): if
    it raises, the whole transaction rolls back, its writes with it, and _record_failure records
    the failure in a new one."""
    now = clock()
    with transaction.atomic():
        admitted = _lock_and_admit(saga_id, step_name, direction, now=now)
        if isinstance(admitted, StepResult):
            return admitted
        saga, definition, step, execution = admitted
        limit_step_transaction(step)
        _saga_running(saga, direction)
        transition(saga, "delivered", StepState.RUNNING, step=step_name, direction=direction, detail=f"delivery {execution.deliveries}")
        context = _context(saga, execution, now=now)
        try:
            value = _call(step, direction, context, faults)
        except Exception as exc:  # noqa: BLE001 - the boundary around user code: recorded below
            if is_infrastructure_error(exc):
                # The database went away or a lock was not granted in time (a frozen process holds
                # it): not the step's failure. step_run releases the delivery; the task retries.
                raise
            error = exc
            transaction.set_rollback(True)
        else:
            now = clock()
            execution.attempts += 1
            execution.result = value
            _mark(saga, execution, StepState.COMPLETED, now=now)
            execution.save()
            _after_completion(saga, definition, step, direction, now=now)
            return StepResult(Outcome.DONE)
    return _record_failure(saga_id, step_name, direction, error, now=clock())


def _lock_and_admit(saga_id, step_name: str, direction: str, *, now: datetime, counting: bool = False):
    """Under the saga and step locks: (saga, definition, step, execution) for a delivery that may
    run the step, or the StepResult that says why it may not. `counting`: this delivery is not
    counted yet (the locked path of transaction 1); count it before checking the budget."""
    saga = lock_saga(saga_id)
    if not _runs(saga, direction):
        log.info("saga_stale_message saga=%s step=%s direction=%s state=%s", saga.id, step_name, direction, saga.state)
        return StepResult(Outcome.STALE)
    definition = get_definition(saga.name, saga.version)
    execution = lock_step(saga, step_name, direction)
    if execution is None:
        # No such step, or a compensation of a step the log does not show as having taken effect.
        log.warning("saga_message_dropped saga=%s step=%s direction=%s: the saga log has no such step", saga.id, step_name, direction)
        return StepResult(Outcome.STALE)
    if execution.state == StepState.COMPLETED:
        # redelivered, or a concurrent delivery finished it while this one waited
        log.info("saga_step_redelivered saga=%s step=%s direction=%s: already completed", saga.id, step_name, direction)
        return StepResult(Outcome.DONE)
    waiting_for = _not_its_turn(saga, definition, execution)
    if waiting_for:
        # A stray or forged message: the log decides what may run (rule 13). Not counted as a
        # delivery, so such messages cannot spend the step's budget either.
        log.warning(
            "saga_message_dropped saga=%s step=%s direction=%s: out of order, waiting for %s",
            saga.id, step_name, direction, ", ".join(waiting_for),
        )
        return StepResult(Outcome.STALE)
    if counting:
        execution.deliveries += 1
    early = _admit(saga, definition, execution, direction, now=now)
    if early is not None:
        return early
    return saga, definition, definition.step(step_name), execution


def _not_its_turn(saga: SagaInstance, definition: Saga, execution: StepExecution) -> list[str]:
    """The steps that must finish before this one may run: for a forward step every earlier
    forward step not COMPLETED; for a compensation run newest-first, every newer compensation not
    finished yet. Empty when it is this step's turn."""
    steps = StepExecution.objects.filter(saga=saga, direction=execution.direction)
    if execution.direction == FORWARD:
        blocking = steps.filter(position__lt=execution.position).exclude(state=StepState.COMPLETED)
    elif definition.compensate_in_parallel:
        return []
    else:
        blocking = steps.filter(position__gt=execution.position, state__in=UNFINISHED_STEP)
    return [f"{name} ({state})" for name, state in blocking.order_by("position").values_list("name", "state")]


def _saga_running(saga: SagaInstance, direction: str) -> None:
    """A forward step is about to run or record its outcome: a PENDING saga has started (saved
    with the outcome)."""
    if direction == FORWARD and saga.state == SagaState.PENDING:
        old, saga.state = saga.state, SagaState.RUNNING
        transition(saga, old, saga.state)


def _context(saga: SagaInstance, execution: StepExecution, *, now: datetime) -> StepContext:
    return StepContext(
        saga_id=saga.id,
        saga_name=saga.name,
        step=execution.name,
        direction=execution.direction,
        input=saga.input,
        results=_LazyResults(saga.id),
        attempt=execution.attempts + 1,
        now=now,
    )


def _call(step: Step, direction: str, context: StepContext, faults: frozenset[str]):
    if FaultKind.BUSINESS in faults:
        raise InjectedBusinessError(f"injected business failure in {step.name}")
    if FaultKind.TRANSIENT in faults:
        raise InjectedTransientError(f"injected transient failure in {step.name}")
    function = step.function(direction)
    value = function(context) if function else None
    return json.loads(json.dumps(value, cls=DjangoJSONEncoder, allow_nan=False))


def _record_failure(saga_id, step_name: str, direction: str, error: BaseException, *, now: datetime) -> StepResult:
    """After the action raised and its transaction rolled back: count the attempt and schedule a
    retry, or fail the step (and run its on_failure hook, in the same transaction)."""
    with transaction.atomic():
        admitted = _lock_and_admit(saga_id, step_name, direction, now=now)
        if isinstance(admitted, StepResult):
            return admitted  # meanwhile another delivery finished the step, or the saga moved on
        saga, definition, step, execution = admitted
        _saga_running(saga, direction)
        context = _context(saga, execution, now=now)
        execution.attempts += 1
        policy = step.policy(direction)
        detail = _describe(error)
        if policy.is_retryable(error) and execution.attempts < policy.max_attempts:
            countdown = policy.delay(execution.attempts)
            _mark(saga, execution, StepState.RETRYING, now=now, error=detail, detail=f"retry in {countdown:.2f}s")
            execution.save()
            saga_touch(saga, now=now, expect_within=countdown + step.timeout)
            saga.save(update_fields=["state", "updated_at", "stuck_after"])
            return StepResult(Outcome.RETRY, countdown=countdown, error=error)
        _mark(saga, execution, StepState.FAILED, now=now, error=detail)
        execution.reason = _client_reason(error)
        execution.outcome_uncertain = not isinstance(error, BusinessError)
        execution.save()
        saga.save(update_fields=["state"])
        if direction == FORWARD and step.on_failure is not None:
            step.on_failure(context, error)
        return StepResult(Outcome.FAILED, error=error)


def _after_completion(saga: SagaInstance, definition: Saga, step: Step, direction: str, *, now: datetime) -> None:
    if direction == FORWARD:
        position = definition.position(step.name)
        if position == len(definition.steps) - 1:
            saga_finish(saga, SagaState.COMPLETED, now=now)
        else:
            saga_touch(saga, now=now, expect_within=definition.steps[position + 1].timeout)
            saga.save(update_fields=["state", "stuck_after", "updated_at"])
    else:
        saga_touch(saga, now=now, expect_within=step.timeout)
        saga.save(update_fields=["updated_at", "stuck_after"])
        saga_finish_compensation_if_done(saga, now=now)


def _mark(saga: SagaInstance, execution: StepExecution, state: str, *, now: datetime, error: str = "", detail: str = "") -> None:
    old, execution.state = execution.state, state
    if state == StepState.RUNNING and execution.started_at is None:
        execution.started_at = now
    if state in (StepState.COMPLETED, StepState.FAILED):
        execution.finished_at = now
    if error:
        execution.last_error = error[:4000]
    transition(saga, old, state, step=execution.name, direction=execution.direction, detail=detail or error)


class _LazyResults(Mapping):
    """The forward results of the saga's completed steps, read when a step first looks at them
    (most actions only need the input)."""

    def __init__(self, saga_id):
        self._saga_id = saga_id
        self._results: dict | None = None

    def _load(self) -> dict:
        if self._results is None:
            rows = StepExecution.objects.filter(saga_id=self._saga_id, direction=FORWARD, state=StepState.COMPLETED)
            self._results = dict(rows.values_list("name", "result"))
        return self._results

    def __getitem__(self, name: str):
        return self._load()[name]

    def __iter__(self):
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())

    def __repr__(self) -> str:
        return repr(self._load())


def _describe(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def _client_reason(error: BaseException) -> str:
    """A business refusal's own message, which BusinessError promises is fit for the end user;
    nothing for any other failure (its type, text and traceback are internals)."""
    return str(error)[:2000] if isinstance(error, BusinessError) else ""


def _die(saga_id, step_name: str, when: str) -> None:
    log.warning("saga_fault_crash saga=%s step=%s killing worker process %s %s", saga_id, step_name, os.getpid(), when)
    os.kill(os.getpid(), signal.SIGKILL)
