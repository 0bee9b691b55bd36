"""Running one delivery of a step (or compensation), and handling a step's final failure.

A delivery's life (`Delivery`): admit, run, then succeed or fail.

  admit    under the saga row lock (one statement locks the saga and its steps of that
           direction): the saga runs this direction, the log has the step, it is its turn, it has
           no outcome yet, its delivery budget is not spent and the saga's deadline has not passed;
  run      the action, inside the same transaction (fault injection and other interceptors
           wrap it, sagas.interceptors);
  succeed  the step's COMPLETED mark and the saga's progress in one statement, then commit: the
           action's writes and the mark commit together (rule 2);
  fail     the transaction rolls back whole, the action's writes with it, and a second one
           records the attempt: a retry, or the final failure.

So a step's first delivery is one transaction. Whether a delivery is counted before its action
(`Counting`) depends on whether the one before it may have died without a trace: the broker
flags what it delivers again (kombu's Redis transport flags the messages it restores, AMQP those
it requeues), the sweeper marks what it re-sends, and a transport that cannot flag (the embedded
one) gets every delivery counted first. A step that keeps killing its worker is failed after
`max_deliveries` deliveries that never finished, whichever way they were counted.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from django.core.serializers.json import DjangoJSONEncoder
from django.db import InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from sagas import interceptors, metrics, sql
from sagas.counting import Counting
from sagas.definition import FORWARD, HARD_LIMIT_GRACE, Saga, Step, StepContext, get_definition
from sagas.exceptions import BusinessError, InvalidStepResult, StepFailedEarlier, UnknownSagaDefinition, WorkerLostTooOften
from sagas.locks import lock_saga, lock_step
from sagas.log import step_context_add, transition
from sagas.models import SagaInstance, SagaState, StepExecution, StepState
from sagas.services import (
    FINISH_FIELDS,
    RUNS_FORWARD,
    UNFINISHED_STEP,
    saga_advance,
    saga_begin_compensation,
    saga_failure,
    saga_finish_compensation_if_done,
    saga_finished_hook,
    saga_mark_finished,
    saga_touch,
)
from sagas.waits import is_infrastructure_error, limit_step_transaction

log = logging.getLogger("sagas")

Clock = Callable[[], datetime]


class Outcome(enum.Enum):
    DONE = "done"  # completed now or earlier: the saga moves on
    RETRY = "retry"  # a transient failure; try again after `countdown`
    FAILED = "failed"  # final failure: raise `error` so the errback runs
    STALE = "stale"  # the saga no longer runs this direction, or it is not this step's turn: drop


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
    counting: Counting = Counting.IN_STEP,
    clock: Clock = timezone.now,
    expected_timeout: float | None = None,
) -> StepResult:
    """Run one delivery of a step or compensation (`counting`: by default, that of a first
    delivery on a transport that flags redeliveries). Never raises the action's exception: the outcome says what the task must do.
    Raises SagaNotFound, and a database error for the task to retry (no attempt or delivery spent)."""
    delivery = Delivery(
        saga_id=saga_id,
        step_name=step_name,
        direction=direction,
        counting=counting,
        republish=republish,
        clock=clock,
        interceptors=interceptors.configured(),
        expected_timeout=expected_timeout,
    )
    return delivery.run()


@dataclass
class Delivery:
    saga_id: UUID | str
    step_name: str
    direction: str
    counting: Counting
    republish: Callable[[], None]
    clock: Clock = timezone.now
    interceptors: tuple[interceptors.Interceptor, ...] = ()
    expected_timeout: float | None = None  # the step's timeout, if the message tells it
    saga_name: str | None = field(default=None, init=False)  # known once the saga row is read
    counted: bool = field(default=False, init=False)  # this delivery's count is committed

    def run(self) -> StepResult:
        for interceptor in self.interceptors:
            interceptor.delivered(self)
        result = self.count_before() if self.counting.counts_first else None
        if result is None:
            try:
                result = self._run_step()
            except (OperationalError, InterfaceError) as exc:
                self._release()
                log.warning(
                    "saga_step_infrastructure_error saga=%s step=%s direction=%s: %s (retried; no attempt or delivery spent)",
                    self.saga_id, self.step_name, self.direction, _first_line(exc),
                )
                raise
            except UnknownSagaDefinition:
                self._release()  # this worker lacks the definition: the task retries, spending nothing
                raise
        for interceptor in self.interceptors:
            interceptor.finished(self, result)
        return result

    def count_before(self) -> StepResult | None:
        """Commit this delivery's count (and a death the broker tells of) before any work.
        Returns an early result, or None to go on and run the step."""
        now = self.clock()
        if self.counting is Counting.BEFORE and self.direction == FORWARD:
            if sql.count_delivery(self.saga_id, self.step_name, self.direction, now=now):
                self.counted = True
                return None
        with transaction.atomic():
            # A redelivery also counts the death the broker tells of, unless that delivery was
            # counted already (_admit sees it in the log).
            admitted = self._admit(now, count=1 + self.counting.deaths)
            if isinstance(admitted, StepResult):
                return admitted
            saga, _, _, execution = admitted
            _mark(saga, execution, StepState.RUNNING, now=now)
            execution.save()
        self.counted = True
        return None

    def _run_step(self) -> StepResult:
        """The step's transaction: admit, run the action, record success; on failure, record it
        in a second transaction. The action runs without a savepoint of its own: if it raises,
        the whole transaction rolls back."""
        now = self.clock()
        with transaction.atomic():
            admitted = self._admit(now, count=0 if self.counted else 1, limit_timeout=self.expected_timeout)
            if isinstance(admitted, StepResult):
                return admitted
            saga, definition, step, execution = admitted
            if step.timeout != self.expected_timeout:  # the message did not tell it, or told another
                limit_step_transaction(step)
            _saga_running(saga, self.direction)
            transition(saga, "delivered", StepState.RUNNING, step=step.name, direction=self.direction, detail=f"delivery {execution.deliveries}")
            context = _context(saga, execution, now=now)
            try:
                value = self._call(step, context)
            except Exception as exc:  # noqa: BLE001 - the boundary around user code: recorded below
                if is_infrastructure_error(exc):
                    # The database went away or a lock was not granted in time (a frozen process
                    # holds it): not the step's failure. The task retries the delivery.
                    raise
                error = exc
                transaction.set_rollback(True)
            else:
                self._succeed(saga, definition, step, execution, value)
                return StepResult(Outcome.DONE)
        return self._fail(error)

    def _call(self, step: Step, context: StepContext):
        function = step.function(self.direction)

        def action():
            with contextlib.nullcontext() if step.savepoints else sql.savepoints_off(f"step {step.name} (Step(..., savepoints=True))"):
                value = function(context) if function else None
            return _json_result(step.name, self.direction, value)

        call = action
        for interceptor in reversed(self.interceptors):
            call = functools.partial(interceptor.call, self, call)
        return call()

    def _admit(self, now: datetime, *, count: int, limit_timeout: float | None = None):
        """Under the saga and step locks: (saga, definition, step, execution) for a delivery that
        may run the step, or the StepResult that says why it may not. `count`: deliveries to add
        to the step's count now (this one, and a death the broker told of); they are saved by
        whoever saves the step row in this transaction. `limit_timeout`: set the wait limits of a
        step with that timeout in the same statement (sql.lock_saga_and_steps)."""
        locked = sql.lock_saga_and_steps(self.saga_id, self.direction, limit_timeout=limit_timeout)
        saga, executions = locked if locked is not None else (lock_saga(self.saga_id), [])
        self.saga_name = saga.name
        step_context_add(saga_name=saga.name, saga_version=saga.version)
        if not _runs(saga, self.direction):
            log.info("saga_stale_message saga=%s step=%s direction=%s state=%s", saga.id, self.step_name, self.direction, saga.state)
            return StepResult(Outcome.STALE)
        definition = get_definition(saga.name, saga.version)
        execution = next((e for e in executions if e.name == self.step_name), None)
        if execution is None:
            # No such step, or a compensation of a step the log does not show as having taken effect.
            log.warning("saga_message_dropped saga=%s step=%s direction=%s: the saga log has no such step", saga.id, self.step_name, self.direction)
            return StepResult(Outcome.STALE)
        if execution.state == StepState.COMPLETED:
            # redelivered, or a concurrent delivery finished it while this one waited
            log.info("saga_step_redelivered saga=%s step=%s direction=%s: already completed", saga.id, self.step_name, self.direction)
            return StepResult(Outcome.DONE)
        waiting_for = _not_its_turn(definition, execution, executions)
        if waiting_for:
            # A stray or forged message: the log decides what may run (rule 13). Not counted as a
            # delivery, so such messages cannot spend the step's budget either.
            log.warning(
                "saga_message_dropped saga=%s step=%s direction=%s: out of order, waiting for %s",
                saga.id, self.step_name, self.direction, ", ".join(waiting_for),
            )
            return StepResult(Outcome.STALE)
        if count > 1 and execution.deliveries > execution.attempts:
            count -= 1  # the death the broker told of was counted already (that delivery counted itself first)
        if count:
            execution.deliveries += count
            execution.started_at = execution.started_at or now
        step_context_add(delivery=execution.deliveries)
        early = _budget_or_deadline(saga, definition, execution, self.direction, now=now)
        if early is not None:
            return early
        return saga, definition, definition.step(self.step_name), execution

    def _succeed(self, saga: SagaInstance, definition: Saga, step: Step, execution: StepExecution, value) -> None:
        now = self.clock()
        execution.attempts += 1
        execution.result = value
        _mark(saga, execution, StepState.COMPLETED, now=now)
        if self.direction != FORWARD:
            execution.save()
            saga_touch(saga, now=now, expect_within=step.timeout)
            saga.save(update_fields=["updated_at", "stuck_after"])
            saga_finish_compensation_if_done(saga, now=now)
            return
        position = definition.position(step.name)
        last = position == len(definition.steps) - 1
        if last:
            saga_mark_finished(saga, SagaState.COMPLETED, now=now)
            saga_fields = FINISH_FIELDS
        else:
            saga_touch(saga, now=now, expect_within=definition.steps[position + 1].timeout)
            saga_fields = ("state", "updated_at", "stuck_after")
        sql.save_step_and_saga(execution, _COMPLETED_FIELDS, saga, saga_fields)
        if last:
            saga_finished_hook(saga)

    def _fail(self, error: BaseException) -> StepResult:
        """After the action raised and its transaction rolled back: count the attempt (and this
        delivery, unless counted before) and schedule a retry, or fail the step and run its
        on_failure hook, in the same transaction."""
        now = self.clock()
        with transaction.atomic():
            admitted = self._admit(now, count=0 if self.counted else 1)
            if isinstance(admitted, StepResult):
                return admitted  # meanwhile another delivery finished the step, or the saga moved on
            saga, definition, step, execution = admitted
            _saga_running(saga, self.direction)
            context = _context(saga, execution, now=now)
            execution.attempts += 1
            policy = step.policy(self.direction)
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
            if self.direction == FORWARD and step.on_failure is not None:
                step.on_failure(context, error)
            return StepResult(Outcome.FAILED, error=error)

    def _release(self) -> None:
        """Uncount a delivery counted before its action that a database error interrupted before
        it recorded an outcome. Best effort: if the database is still unreachable the delivery
        stays counted as lost."""
        if not self.counted:
            return  # counted only with an outcome, which was rolled back
        try:
            if not connection.in_atomic_block:
                connection.close_if_unusable_or_obsolete()  # reconnect if the error broke the connection
            with transaction.atomic():
                saga = lock_saga(self.saga_id)
                execution = lock_step(saga, self.step_name, self.direction)
                if execution is not None and execution.state == StepState.RUNNING and execution.deliveries > execution.attempts:
                    execution.deliveries -= 1
                    execution.save(update_fields=["deliveries"])
        except (OperationalError, InterfaceError):
            log.warning("saga_delivery_not_released saga=%s step=%s direction=%s", self.saga_id, self.step_name, self.direction)


_COMPLETED_FIELDS = ("state", "attempts", "deliveries", "result", "started_at", "finished_at")


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


def _budget_or_deadline(saga: SagaInstance, definition: Saga, execution: StepExecution, direction: str, *, now: datetime) -> StepResult | None:
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
        metrics.lost_delivery(saga.name, step.name, direction)
        log.warning(
            "saga_step_lost_delivery saga=%s step=%s direction=%s unfinished=%s", saga.id, step.name, direction, unfinished
        )
    return None


def _not_its_turn(definition: Saga, execution: StepExecution, executions: list[StepExecution]) -> list[str]:
    """The steps that must finish before this one may run, from its saga's steps of the same
    direction: for a forward step every earlier one not COMPLETED; for a compensation run
    newest-first, every newer one not finished yet. Empty when it is this step's turn."""
    if execution.direction == FORWARD:
        blocking = [e for e in executions if e.position < execution.position and e.state != StepState.COMPLETED]
    elif definition.compensate_in_parallel:
        return []
    else:
        blocking = [e for e in executions if e.position > execution.position and e.state in UNFINISHED_STEP]
    return [f"{e.name} ({e.state})" for e in sorted(blocking, key=lambda e: e.position)]


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
        reason=saga_failure(saga) if execution.direction != FORWARD else None,
    )


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


def _json_result(step: str, direction: str, value):
    """`value` as the saga log keeps it (JSON); InvalidStepResult, naming the step and the type,
    when it cannot be (never retried: trying again returns the same kind of value)."""
    try:
        return json.loads(json.dumps(value, cls=DjangoJSONEncoder, allow_nan=False))
    except (TypeError, ValueError) as exc:
        what = "compensation of step" if direction != FORWARD else "step"
        raise InvalidStepResult(
            f"{what} {step} returned a {type(value).__name__}, which is not JSON ({exc}); return a dict, list, "
            "str, number, bool or None"
        ) from None


def _describe(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {_module_path(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def _module_path(filename: str) -> str:
    """`filename` from its import root (sagas/faults.py), not from where this deployment put it."""
    roots = [root for root in sys.path if root and filename.startswith(os.path.join(root, ""))]
    return os.path.relpath(filename, max(roots, key=len)) if roots else os.path.basename(filename)


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def _client_reason(error: BaseException) -> str:
    """A business refusal's own message, which BusinessError promises is fit for the end user;
    nothing for any other failure (its type, text and traceback are internals)."""
    return str(error)[:2000] if isinstance(error, BusinessError) else ""
