"""The saga engine's Python API and its saga-level decisions.

Public: `saga_start`, `saga_abort`, `saga_retry_compensation`, `saga_redrive`, `saga_sweep`.
Everything decides from the saga log under the saga row lock and sends messages only after the
commit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, transaction
from django.utils import timezone

from sagas import dispatch, metrics
from sagas.definition import COMPENSATE, FORWARD, Failure, Outcome, Saga, get_definition
from sagas.exceptions import SagaError, SagaIdempotencyConflict, SagaStateConflict, UnknownSagaDefinition
from sagas.locks import lock_saga, lock_steps
from sagas.log import transition
from sagas.models import ACTIVE_STATES, TERMINAL_STATES, HousekeepingRun, SagaInstance, SagaState, StepExecution, StepState
from sagas.selectors import sagas_stuck

log = logging.getLogger("sagas")

RUNS_FORWARD = (SagaState.PENDING, SagaState.RUNNING)
UNFINISHED_STEP = (StepState.PENDING, StepState.RUNNING, StepState.RETRYING)


class InvalidSagaInput(SagaError):
    """The saga input is not a JSON object."""


def saga_start(
    *,
    definition: Saga,
    input: Mapping[str, Any],
    idempotency_key: str | None = None,
    now: datetime | None = None,
) -> SagaInstance:
    """Record a new saga and send its first step once the surrounding transaction commits.

    Call it inside the transaction that writes the business rows the saga starts from. Starting
    twice with the same idempotency key and input returns the first saga; with another input it
    raises SagaIdempotencyConflict. Raises InvalidSagaInput.
    """
    now = now or timezone.now()
    payload = _json_object(input)
    # No savepoint of its own: inside the caller's transaction, a failure here fails that one.
    with transaction.atomic(savepoint=False):
        try:
            with transaction.atomic():
                saga = SagaInstance.objects.create(
                    name=definition.name,
                    version=definition.version,
                    definition_fingerprint=definition.fingerprint,
                    idempotency_key=idempotency_key,
                    input=payload,
                    created_at=now,
                    updated_at=now,
                    deadline_at=now + definition.deadline if definition.deadline else None,
                    stuck_after=_stuck_after(now, definition.steps[0].timeout),
                )
        except IntegrityError:
            if idempotency_key is None:
                raise
            # Started before with this key (the unique constraint says so, race-free).
            earlier = SagaInstance.objects.get(name=definition.name, idempotency_key=idempotency_key)
            if earlier.input != payload:
                raise SagaIdempotencyConflict(
                    f"saga {definition.name} with idempotency key {idempotency_key!r} was started before with another "
                    f"input (saga {earlier.id}); a key names one request: use a new key for a new input"
                ) from None
            return earlier
        StepExecution.objects.bulk_create(
            StepExecution(saga=saga, name=step.name, position=position, direction=FORWARD)
            for position, step in enumerate(definition.steps)
        )
        transition(saga, "-", SagaState.PENDING, detail=f"idempotency_key={idempotency_key}")
        metrics.saga_started(saga.name, saga.version)
        transaction.on_commit(lambda: dispatch.send_forward(saga.id, definition, from_position=0))
    return saga


# Why a saga in each of these states cannot be aborted (an operator sees this in a 409).
_NOT_ABORTABLE = {
    SagaState.COMPLETED: "it COMPLETED; there is nothing to abort",
    SagaState.COMPENSATED: "it is COMPENSATED already; there is nothing left to undo",
    SagaState.FAILED: "it is FAILED: a compensation needs attention; retry the compensation instead",
}


def saga_abort(*, saga_id: UUID | str, reason: str = "aborted by operator", now: datetime | None = None) -> SagaInstance:
    """Stop a running saga and compensate what it completed. Waits for a step that is running
    right now to finish first. Aborting a saga that is compensating already returns it unchanged.
    Raises SagaNotFound, SagaStateConflict (it COMPLETED, COMPENSATED or FAILED, or this
    deployment does not know its definition)."""
    now = now or timezone.now()
    with transaction.atomic():
        saga = lock_saga(saga_id)
        if saga.state in _NOT_ABORTABLE:
            raise SagaStateConflict(f"saga {saga.id} cannot be aborted: {_NOT_ABORTABLE[saga.state]}")
        if saga.state in RUNS_FORWARD:
            saga_begin_compensation(saga, _operable_definition(saga, "aborted"), reason=reason, now=now)
    return saga


def saga_retry_compensation(*, saga_id: UUID | str, now: datetime | None = None) -> SagaInstance:
    """Give a FAILED saga's failed compensations a fresh retry budget and run them again.
    Raises SagaNotFound, SagaStateConflict (the saga is not FAILED)."""
    now = now or timezone.now()
    with transaction.atomic():
        saga = lock_saga(saga_id)
        if saga.state != SagaState.FAILED:
            raise SagaStateConflict(f"saga {saga.id} is {saga.state}; only a FAILED saga's compensation can be retried")
        definition = _operable_definition(saga, "retried")
        for execution in lock_steps(saga, COMPENSATE):
            if execution.state == StepState.FAILED:
                execution.state = StepState.PENDING
                execution.attempts = execution.deliveries = 0
                execution.finished_at = None
                execution.save(update_fields=["state", "attempts", "deliveries", "finished_at"])
                transition(saga, StepState.FAILED, StepState.PENDING, step=execution.name, direction=COMPENSATE, detail="retry")
        _set_state(saga, SagaState.COMPENSATING, now=now, detail="operator retry")
        saga.finished_at = None
        saga.stuck_after = _stuck_after(now, max(step.timeout for step in definition.steps))
        saga.save()
        saga_advance(saga, definition, now=now)
    return saga


def saga_definition_adopt(*, name: str, version: int) -> int:
    """Record the registered definition of `name` v`version` as the one its unfinished sagas run
    on, after an in-place change the operator knows they can finish under (the system check
    refuses a deploy otherwise). Returns how many sagas changed. Raises UnknownSagaDefinition."""
    from sagas.versions import NEEDS_DEFINITION

    definition = get_definition(name, version)
    changed = (
        SagaInstance.objects.filter(name=name, version=version, state__in=NEEDS_DEFINITION)
        .exclude(definition_fingerprint=definition.fingerprint)
        .update(definition_fingerprint=definition.fingerprint)
    )
    log.warning("saga_definition_adopted name=%s v=%s sagas=%s fingerprint=%s", name, version, changed, definition.fingerprint)
    return changed


def saga_sweep(*, now: datetime | None = None, limit: int | None = None) -> dict[str, int]:
    """Compensate sagas past their deadline and re-drive sagas that made no progress within their
    step timeout (their message was lost). Safe to run from several beats at once: each saga is
    claimed with SKIP LOCKED and its next check pushed back. Returns counts."""
    now = now or timezone.now()
    limit = limit or settings.SAGAS_SWEEP_BATCH
    overdue = redriven = 0
    with transaction.atomic():
        for saga in (
            SagaInstance.objects.select_for_update(skip_locked=True)
            .filter(state__in=RUNS_FORWARD, deadline_at__lt=now)
            .order_by("deadline_at")[:limit]
        ):
            definition = _sweepable_definition(saga, now=now)
            if definition is None:
                continue
            saga_begin_compensation(saga, definition, reason="deadline exceeded", now=now)
            overdue += 1
    with transaction.atomic():
        for saga in sagas_stuck(now=now, sagas=SagaInstance.objects.select_for_update(skip_locked=True)).order_by("stuck_after")[:limit]:
            definition = _sweepable_definition(saga, now=now)
            if definition is None:
                continue
            _redrive(saga, definition, now=now, by="sweeper")
            redriven += 1
    return {"overdue": overdue, "redriven": redriven}


def saga_redrive(*, saga_id: UUID | str, by: str = "operator", now: datetime | None = None) -> SagaInstance:
    """Re-send what the saga log says comes next for one unfinished saga, now, as the sweeper does
    for a saga past its stuck_after (e.g. after the broker lost its messages). Harmless for a saga
    that is moving (every step is idempotent), but the re-sent message counts as a delivery of its
    step. Raises SagaNotFound, SagaStateConflict (the saga is finished, or this deployment does not
    know its definition)."""
    now = now or timezone.now()
    with transaction.atomic():
        saga = lock_saga(saga_id)
        if saga.state not in ACTIVE_STATES:
            advice = "retry the compensation instead" if saga.state == SagaState.FAILED else "nothing is left to send"
            raise SagaStateConflict(f"saga {saga.id} cannot be re-driven: it is {saga.state}; {advice}")
        _redrive(saga, _operable_definition(saga, "re-driven"), now=now, by=by)
    return saga


def _redrive(saga: SagaInstance, definition: Saga, *, now: datetime, by: str) -> None:
    """Count a re-drive, push the sweeper's next look back, and send what comes next (marked as a
    re-drive). The caller holds the saga row lock."""
    saga.redrives += 1
    # Back off per saga so a long queue backlog is not answered with ever more messages.
    backoff = min(600.0, max(s.timeout for s in definition.steps) * 2 ** min(saga.redrives, 6))
    saga.stuck_after = now + timedelta(seconds=backoff)
    saga.save(update_fields=["redrives", "stuck_after"])
    log.warning("saga_redrive saga=%s name=%s state=%s redrives=%s by=%s", saga.id, saga.name, saga.state, saga.redrives, by)
    saga_advance(saga, definition, now=now, redrive=True)


def housekeeping_record(*, task: str, now: datetime, count: int = 0, more: bool = False) -> None:
    """Record a run of a periodic task (HousekeepingRun): when it ran, what it did (`count`), and
    whether it stopped at its time budget with work left (`more`)."""
    HousekeepingRun.objects.update_or_create(task=task, defaults={"ran_at": now, "count": count, "more": more})


# --- decisions shared by the runner, the errback, the sweeper and the operator actions ----------


def saga_advance(saga: SagaInstance, definition: Saga, *, now: datetime, redrive: bool = False) -> None:
    """Send whatever the saga log says comes next. The caller holds the saga row lock.

    Re-sending work that is already in flight is harmless (every step is idempotent), so this
    also serves to re-drive a saga whose messages were lost (`redrive`: the sweeper does so, and
    the message it sends says so; see dispatch.REDRIVE_HEADER)."""
    if saga.state in RUNS_FORWARD:
        forward = lock_steps(saga, FORWARD)
        failed = next((e for e in forward if e.state == StepState.FAILED), None)
        if failed is not None:
            saga_begin_compensation(saga, definition, reason=f"step {failed.name} failed: {failed.last_error}", now=now)
            return
        pending = sorted((e for e in forward if e.state != StepState.COMPLETED), key=lambda e: e.position)
        if not pending:
            saga_finish(saga, SagaState.COMPLETED, now=now)
            return
        position = pending[0].position
        transaction.on_commit(lambda: dispatch.send_forward(saga.id, definition, from_position=position, redrive=redrive))
    elif saga.state == SagaState.COMPENSATING:
        compensations = _newest_first(lock_steps(saga, COMPENSATE))
        failed = [e for e in compensations if e.state == StepState.FAILED]
        if failed and not _continues_past_failure(definition):
            saga_finish(saga, SagaState.FAILED, now=now, reason=_compensation_failure(failed))
            return
        remaining = [e.name for e in compensations if e.state in UNFINISHED_STEP]
        if not remaining:
            saga_finish_compensation_if_done(saga, now=now)
            return
        transaction.on_commit(
            lambda: dispatch.send_compensations(saga.id, definition, remaining, direction=COMPENSATE, redrive=redrive)
        )


def saga_begin_compensation(saga: SagaInstance, definition: Saga, *, reason: str, now: datetime) -> None:
    """Switch a running saga to COMPENSATING and send the compensations of the steps the saga log
    shows COMPLETED, newest first. The caller holds the saga row lock."""
    forward = lock_steps(saga, FORWARD)
    for execution in forward:
        if execution.state in (StepState.RUNNING, StepState.RETRYING):
            # Its pending message will find the saga compensating and be dropped.
            execution.state = StepState.FAILED
            execution.last_error = execution.last_error or f"abandoned: {reason}"
            execution.finished_at = now
            execution.outcome_uncertain = True
            execution.save(update_fields=["state", "last_error", "finished_at", "outcome_uncertain"])
    completed = sorted(
        (e for e in forward if definition.step(e.name).compensation and _took_or_may_have_taken_effect(e, definition)),
        key=lambda e: e.position,
        reverse=True,
    )
    existing = {e.name for e in lock_steps(saga, COMPENSATE)}
    StepExecution.objects.bulk_create(
        StepExecution(saga=saga, name=e.name, position=e.position, direction=COMPENSATE)
        for e in completed
        if e.name not in existing
    )
    saga.failure_reason = reason[:2000]
    _set_state(saga, SagaState.COMPENSATING, now=now, detail=reason)
    saga.stuck_after = _stuck_after(now, max((definition.step(e.name).timeout for e in completed), default=1.0))
    saga.save()
    saga_advance(saga, definition, now=now)


def _took_or_may_have_taken_effect(execution: StepExecution, definition: Saga) -> bool:
    if execution.state == StepState.COMPLETED:
        return True
    uncertain = execution.state == StepState.FAILED and execution.outcome_uncertain
    return uncertain and definition.step(execution.name).compensate_uncertain


def saga_finish_compensation_if_done(saga: SagaInstance, *, now: datetime) -> None:
    """COMPENSATED once every compensation completed; FAILED once every one is finished and any
    failed. The caller holds the saga row lock."""
    compensations = lock_steps(saga, COMPENSATE)
    if any(e.state in UNFINISHED_STEP for e in compensations):
        return
    failed = [e for e in compensations if e.state == StepState.FAILED]
    if failed:
        saga_finish(saga, SagaState.FAILED, now=now, reason=_compensation_failure(failed))
    else:
        saga_finish(saga, SagaState.COMPENSATED, now=now)


def saga_touch(saga: SagaInstance, *, now: datetime, expect_within: float) -> None:
    """Record progress: the sweeper leaves the saga alone for `expect_within` seconds (+ grace)."""
    saga.updated_at = now
    saga.stuck_after = _stuck_after(now, expect_within)


def saga_finish(saga: SagaInstance, state: str, *, now: datetime, reason: str = "") -> None:
    """Record a terminal state and run the definition's on_finish hook in the same transaction.
    The caller holds the saga row lock."""
    saga_mark_finished(saga, state, now=now, reason=reason)
    saga.save()
    saga_finished_hook(saga)


# The two halves of saga_finish, for the runner, which saves the saga row together with the step
# that finished it (sagas.logsql).
FINISH_FIELDS = ("state", "updated_at", "finished_at", "stuck_after", "failure_reason")


def saga_mark_finished(saga: SagaInstance, state: str, *, now: datetime, reason: str = "") -> None:
    """Set a terminal state on `saga` (FINISH_FIELDS), unsaved."""
    if reason:
        saga.failure_reason = reason[:2000]
    _set_state(saga, state, now=now, detail=reason)
    saga.finished_at = now
    saga.stuck_after = None


def saga_finished_hook(saga: SagaInstance) -> None:
    """Run the definition's on_finish hook, once the terminal state is saved in this transaction."""
    hook = _definition(saga).on_finish
    if hook is not None:
        hook(saga_outcome(saga))


def saga_outcome(saga: SagaInstance) -> Outcome:
    """How `saga` ended, as its on_finish hook gets it."""
    return Outcome(
        saga_id=saga.id, saga_name=saga.name, version=saga.version, state=saga.state, input=saga.input,
        finished_at=saga.finished_at, failure=saga_failure(saga) if saga.state != SagaState.COMPLETED else None,
    )


def saga_failure(saga: SagaInstance) -> Failure:
    """Why `saga` is being (or was) undone: its failure reason and the forward step that failed,
    if one did, with its business refusal. Reads prefetched `saga.steps` when there are."""
    prefetched = getattr(saga, "_prefetched_objects_cache", {}).get("steps")
    if prefetched is not None:
        failed = next(((e.name, e.reason) for e in sorted(prefetched, key=lambda e: e.position)
                       if e.direction == FORWARD and e.state == StepState.FAILED), None)
    else:
        failed = (
            StepExecution.objects.filter(saga=saga, direction=FORWARD, state=StepState.FAILED)
            .order_by("position").values_list("name", "reason").first()
        )
    step, refusal = failed or (None, "")
    return Failure(reason=saga.failure_reason, step=step, refusal=refusal)


def _set_state(saga: SagaInstance, state: str, *, now: datetime, detail: str = "") -> None:
    old, saga.state, saga.updated_at = saga.state, state, now
    if old != state:
        transition(saga, old, state, detail=detail)
        if state in TERMINAL_STATES:
            metrics.saga_finished(saga.name, saga.version, state)


def _stuck_after(now: datetime, seconds: float) -> datetime:
    return now + timedelta(seconds=seconds + settings.SAGAS_STUCK_GRACE)


def _newest_first(executions: list[StepExecution]) -> list[StepExecution]:
    return sorted(executions, key=lambda e: e.position, reverse=True)


def _continues_past_failure(definition: Saga) -> bool:
    # Parallel compensations are already in flight together; one failing does not stop the rest.
    return definition.continue_on_compensation_failure or definition.compensate_in_parallel


def _compensation_failure(failed: list[StepExecution]) -> str:
    return "; ".join(f"compensation {e.name} failed: {e.last_error}" for e in failed)


def _definition(saga: SagaInstance) -> Saga:
    return get_definition(saga.name, saga.version)


def _operable_definition(saga: SagaInstance, action: str) -> Saga:
    try:
        return _definition(saga)
    except UnknownSagaDefinition:
        raise SagaStateConflict(
            f"saga {saga.id} cannot be {action}: its definition {saga.name} v{saga.version} is not registered "
            "in this deployment (see `manage.py sagas versions`)"
        ) from None


def _sweepable_definition(saga: SagaInstance, *, now: datetime) -> Saga | None:
    """The saga's definition, or None (logged, next check pushed back) when this process does not
    know it, so that one such saga does not roll back the whole sweep batch every time."""
    try:
        return _definition(saga)
    except UnknownSagaDefinition as exc:
        log.error("saga_sweep_unknown_definition saga=%s: %s", saga.id, exc)
        saga.stuck_after = now + timedelta(seconds=600)
        saga.save(update_fields=["stuck_after"])
        return None


def _json_object(value: Mapping[str, Any]) -> dict:
    if not isinstance(value, Mapping):
        raise InvalidSagaInput("saga input must be a mapping")
    try:
        return json.loads(json.dumps(value, cls=DjangoJSONEncoder, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise InvalidSagaInput(f"saga input is not JSON-serializable: {exc}") from None
