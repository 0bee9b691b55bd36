"""The engine's Celery tasks. Each takes ids, makes one call into the engine, and translates the
outcome into what Celery should do with the message."""

import logging
import uuid
from datetime import timedelta

from celery import Task, shared_task
from celery.signals import task_postrun, task_prerun
from celery.exceptions import Ignore, Reject
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from sagas import consumers, dispatch, outbox, relay, retention, runner, services
from sagas.counting import Counting
from sagas.definition import COMPENSATE, FORWARD
from sagas.exceptions import BusinessError, SagaNotFound, UnknownSagaDefinition
from sagas.log import step_context_begin, step_context_end
from sagas.publishers import configured_publisher
from sagas.rejects import message_reject_record

log = logging.getLogger("sagas")


class EngineTask(Task):
    """The base of the engine's tasks: a message whose arguments do not fit the task, or do not
    name a saga step in the right form, is rejected without requeue and recorded (rule 12), not
    run into a TypeError deep inside (or looped on)."""

    def __call__(self, *args, **kwargs):
        fits = getattr(self, "__header__", None)  # Celery's check of the call against the signature
        if fits is not None:
            try:
                fits(*args, **kwargs)
            except TypeError as exc:
                raise self.refuse(f"arguments do not fit {self.name}: {exc}") from None
        return super().__call__(*args, **kwargs)

    def refuse(self, reason: str) -> Reject:
        """Record this message as rejected; raise what this returns."""
        request = self.request
        message_reject_record(
            reason=reason,
            body={"id": request.id, "args": request.args, "kwargs": request.kwargs},
            queue=str((request.delivery_info or {}).get("routing_key") or ""),
            task=self.name,
        )
        return Reject(reason, requeue=False)


def _step_arguments_problem(saga_id, step, direction) -> str:
    """What is wrong with a step message's arguments, or "" when they are well formed."""
    try:
        uuid.UUID(str(saga_id))
    except ValueError:
        return f"saga_id {str(saga_id)[:80]!r} is not a UUID"
    if not isinstance(step, str) or not 0 < len(step) <= 100:
        return "step must be a step name (a string of 1 to 100 characters)"
    if direction not in (FORWARD, COMPENSATE):
        return f"direction must be {FORWARD!r} or {COMPENSATE!r}"
    return ""

def _counting(task: Task, *, resent: bool) -> Counting:
    """How this delivery is counted (sagas.counting): from the broker's redelivered flag and
    whether the engine's sweep re-sent it."""
    return Counting.for_message(
        broker_url=task.app.conf.broker_url or "",
        redelivered=bool((task.request.delivery_info or {}).get("redelivered")),
        resent=resent,
    )


def _soft_time_limit(task: Task) -> float | None:
    """The message's soft time limit: the step's timeout, as sagas.dispatch sends it."""
    limits = task.request.timelimit or (None, None)
    return limits[1] if isinstance(limits[1], (int, float)) else None


STEP_TASKS = ("sagas.run_step", "sagas.step_failed")


def _retry_unknown_definition(task: Task, saga_id: str, step: str, exc: UnknownSagaDefinition):
    """This worker does not have the saga's definition: most likely it was started before the
    code that defines it was deployed. One line, and the message waits for a worker that has it
    (nothing was counted: the step's transaction rolled back)."""
    countdown = settings.SAGAS_UNKNOWN_DEFINITION_RETRY
    log.error(
        "saga_definition_unknown saga=%s step=%s: %s; trying again in %gs. Restart the workers after adding or changing a saga",
        saga_id, step, exc, countdown,
    )
    return task.retry(countdown=countdown, max_retries=None)


@task_prerun.connect
def _step_context_begin(task=None, kwargs=None, **_) -> None:
    """Every line this process logs while a step task runs (Celery's own task lines too) carries
    the step's saga id, step and direction; the runner adds name, version and delivery."""
    if task is not None and task.name in STEP_TASKS and isinstance(kwargs, dict):
        step_context_begin(saga_id=kwargs.get("saga_id"), step=kwargs.get("step"), direction=kwargs.get("direction"))


@task_postrun.connect
def _step_context_end(**_) -> None:
    step_context_end()


# The database being unreachable is an infrastructure fault, not the step's: retry the message
# with backoff (kept below the broker's visibility timeout) instead of failing the saga.
INFRASTRUCTURE_RETRY = {
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "retry_kwargs": {"max_retries": 60},
}


# acks_on_failure_or_timeout=False: a step killed by the hard time limit is requeued like one
# whose worker died (with the embedded SQLAlchemy broker a killed pool child also surfaces this
# way). Celery still sends the errback then; it finds no recorded outcome and leaves the step to
# the requeued message (runner.step_failure_handle). Either way the delivery counts against the
# step's max_deliveries.
@shared_task(
    base=EngineTask,
    bind=True,
    name="sagas.run_step",
    acks_late=True,
    reject_on_worker_lost=True,
    acks_on_failure_or_timeout=False,
    max_retries=None,
    # A business refusal (payment declined, out of stock) fails the step so that its errback runs,
    # but is no error of the system: Celery logs it at INFO, without a traceback.
    throws=(BusinessError,),
    **INFRASTRUCTURE_RETRY,
)
def run_step(self, *, saga_id: str, step: str, direction: str) -> None:
    problem = _step_arguments_problem(saga_id, step, direction)
    if problem:
        raise self.refuse(problem)

    def republish() -> None:
        self.signature_from_request().apply_async()

    counting = _counting(self, resent=bool(getattr(self.request, dispatch.REDRIVE_HEADER, False)))
    try:
        result = runner.step_run(
            saga_id=saga_id, step_name=step, direction=direction, republish=republish, counting=counting,
            expected_timeout=_soft_time_limit(self),
        )
    except SagaNotFound:
        log.warning("saga_missing saga=%s step=%s: dropping the message", saga_id, step)
        raise Ignore() from None
    except UnknownSagaDefinition as exc:
        raise _retry_unknown_definition(self, saga_id, step, exc) from None
    if result.outcome is runner.Outcome.RETRY:
        raise self.retry(countdown=result.countdown, max_retries=None)
    if result.outcome is runner.Outcome.FAILED:
        raise result.error
    if result.outcome is runner.Outcome.STALE:
        raise Ignore()  # no callbacks: the saga no longer runs this direction


@shared_task(base=EngineTask, bind=True, name="sagas.step_failed", acks_late=True, reject_on_worker_lost=True, **INFRASTRUCTURE_RETRY)
def step_failed(self, failed_task_id: str, *, saga_id: str, step: str, direction: str) -> None:
    """The link_error of every step. bind=True makes Celery send it through the broker with the
    failed task's id first, instead of calling it inline in the failing worker."""
    problem = _step_arguments_problem(saga_id, step, direction)
    if problem:
        raise self.refuse(problem)
    try:
        runner.step_failure_handle(saga_id=saga_id, step_name=step, direction=direction, failed_task_id=failed_task_id)
    except SagaNotFound:
        log.warning("saga_missing saga=%s step=%s: dropping the errback", saga_id, step)
    except UnknownSagaDefinition as exc:
        raise _retry_unknown_definition(self, saga_id, step, exc) from None


@shared_task(base=EngineTask, name="sagas.sweep", acks_late=True, **INFRASTRUCTURE_RETRY)
def sweep() -> dict:
    now = timezone.now()
    counts = services.saga_sweep(now=now)
    services.housekeeping_record(task="sagas.sweep", now=now, count=sum(counts.values()))  # for health
    if any(counts.values()):
        log.info("saga_sweep overdue=%s redriven=%s", counts["overdue"], counts["redriven"])
    return counts


@shared_task(base=EngineTask, name="sagas.relay_outbox", acks_late=True, ignore_result=True)
def relay_outbox() -> dict:
    """Run by beat every OUTBOX_RELAY_INTERVAL and kicked after each commit that emitted events."""
    outbox.kick_mark_clear()
    result = relay.outbox_relay(publisher=configured_publisher())
    if result.published or result.failed or result.dead_lettered:
        log.info(
            "outbox_relay published=%s failed=%s dead_lettered=%s rounds=%s",
            result.published, result.failed, result.dead_lettered, result.rounds,
        )
    return {"published": result.published, "failed": result.failed, "dead_lettered": result.dead_lettered}


@shared_task(base=EngineTask, name="sagas.outbox_cleanup", acks_late=True, ignore_result=True, **INFRASTRUCTURE_RETRY)
def outbox_cleanup() -> int:
    now = timezone.now()
    run = relay.outbox_cleanup(now=now)
    services.housekeeping_record(task="sagas.outbox_cleanup", now=now, count=run.deleted, more=run.more)
    return run.deleted


@shared_task(base=EngineTask, name="sagas.prune_sagas", acks_late=True, ignore_result=True, **INFRASTRUCTURE_RETRY)
def prune_sagas() -> int:
    """Settled sagas past SAGAS_RETENTION_DAYS (0: kept forever), with their steps."""
    return prune_task_run("sagas.prune_sagas", retention.sagas_prune, settings.SAGAS_RETENTION_DAYS)


@shared_task(base=EngineTask, name="sagas.prune_inbox", acks_late=True, ignore_result=True, **INFRASTRUCTURE_RETRY)
def prune_inbox() -> int:
    """Inbox rows and delivery counts past SAGAS_INBOX_RETENTION_DAYS (0: kept forever)."""
    return prune_task_run("sagas.prune_inbox", retention.inbox_prune, settings.SAGAS_INBOX_RETENTION_DAYS)


def prune_task_run(task: str, prune, days: float) -> int:
    """One beat run of a retention task: `prune(now=, retention=)` unless `days` is 0, recorded for
    health (HousekeepingRun). The domain apps' prune tasks use it too."""
    period = retention.retention_period(days)
    if period is None:
        return 0
    now = timezone.now()
    run = prune(now=now, retention=period)
    services.housekeeping_record(task=task, now=now, count=run.deleted, more=run.more)
    if run.deleted:
        log.info("%s deleted=%s batches=%s more=%s", task, run.deleted, run.batches, run.more)
    return run.deleted


@shared_task(base=EngineTask, bind=True, name="sagas.consume_event", acks_late=True, reject_on_worker_lost=True, max_retries=None, **INFRASTRUCTURE_RETRY)
def consume_event(self, *, consumer: str, message: dict, redelivery: bool = False) -> None:
    """One event for one consumer, behind its inbox. A failing handler is retried with backoff
    (CONSUMER_MAX_RETRIES times), a business refusal is not; then the consumer gives up on the
    event once (parked, settled by its on_give_up). `redelivery`: sent again by the sweep after
    its message was lost."""
    problem = consumers.message_problem(consumer=consumer, message=message)
    if problem:
        raise self.refuse(problem)
    try:
        consumers.consume(
            consumer=consumer,
            message=message,
            max_deliveries=settings.CONSUMER_MAX_DELIVERIES,
            counting=_counting(self, resent=redelivery),
        )
    except (OperationalError, InterfaceError):
        raise
    except BusinessError as exc:
        consumers.consumer_give_up(consumer=consumer, message=message, reason=f"refused: {type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - the boundary around user handlers: retried, then given up on
        tries = self.request.retries + 1
        if tries > settings.CONSUMER_MAX_RETRIES:
            consumers.consumer_give_up(consumer=consumer, message=message, reason=f"failed {tries} times: {type(exc).__name__}: {exc}")
            return
        countdown = min(settings.CONSUMER_RETRY_MAX_DELAY, 2 ** self.request.retries)
        raise self.retry(exc=exc, countdown=countdown, max_retries=None) from exc


@shared_task(base=EngineTask, name="sagas.consumers_redeliver", acks_late=True, ignore_result=True, **INFRASTRUCTURE_RETRY)
def consumers_redeliver() -> int:
    if "consumers" not in settings.OUTBOX_PUBLISHER:
        return 0  # events go to external consumers only
    now = timezone.now()
    sent = consumers.consumers_redeliver(
        now=now,
        min_age=timedelta(seconds=settings.CONSUMER_REDELIVER_AFTER),
        window=timedelta(hours=settings.CONSUMER_REDELIVER_WINDOW_HOURS),
    )
    services.housekeeping_record(task="sagas.consumers_redeliver", now=now, count=sent)
    return sent
