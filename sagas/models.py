"""The saga log: the source of truth for what a saga did and what must be undone."""

import uuid

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.db.models import Q


class SagaState(models.TextChoices):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    COMPENSATING = "COMPENSATING"
    COMPENSATED = "COMPENSATED"
    FAILED = "FAILED"  # a compensation exhausted its budget: needs attention


ACTIVE_STATES = (SagaState.PENDING, SagaState.RUNNING, SagaState.COMPENSATING)
TERMINAL_STATES = (SagaState.COMPLETED, SagaState.COMPENSATED, SagaState.FAILED)
# Finished for good: what retention may prune (sagas.retention). FAILED waits for an operator.
SETTLED_STATES = (SagaState.COMPLETED, SagaState.COMPENSATED)


class StepState(models.TextChoices):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    RETRYING = "RETRYING"  # a try failed transiently; the next one is scheduled
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class Direction(models.TextChoices):
    FORWARD = "forward"
    COMPENSATE = "compensate"


class SagaInstance(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=100)
    version = models.PositiveIntegerField()
    # Saga.fingerprint of the definition it started with: a deploy that would change it for a
    # saga in flight is refused (sagas.checks). Empty for sagas started before it was recorded.
    definition_fingerprint = models.CharField(max_length=64, blank=True, default="")
    state = models.CharField(max_length=16, choices=SagaState.choices, default=SagaState.PENDING)
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    input = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    failure_reason = models.TextField(blank=True)
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True)
    # The sweeper re-drives an active saga whose stuck_after has passed with no progress.
    stuck_after = models.DateTimeField(null=True, blank=True)
    redrives = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-created_at"]
        # Operator actions (sagas.permissions): checked alike by the staff API, the admin and the CLI.
        permissions = [
            ("retry_saga", "Can retry saga compensation"),
            ("abort_saga", "Can abort saga"),
            ("redrive_saga", "Can re-drive saga"),  # send what comes next again (lost messages)
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["name", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="saga_unique_idempotency_key",
            ),
            models.CheckConstraint(condition=Q(state__in=SagaState.values), name="saga_state_valid"),
        ]
        indexes = [
            models.Index(fields=["state", "stuck_after"], name="saga_stuck_idx"),
            models.Index(fields=["state", "deadline_at"], name="saga_deadline_idx"),
            # Newest first, as the admin lists them (its ordering plus the primary key): a page of
            # a long history is read from the index, not sorted out of the whole table.
            models.Index(fields=["-created_at", "-id"], name="saga_created_idx"),
            # Retention (sagas.retention) takes the settled sagas that finished longest ago, without
            # reading the running, FAILED or recent ones.
            models.Index(fields=["finished_at"], condition=Q(state__in=SETTLED_STATES), name="saga_prunable_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.name} {self.id} ({self.state})"

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class StepExecution(models.Model):
    """One row per step and direction of a saga: what happened to it, how often, and why."""

    # No index of its own: step_unique_per_direction leads with it.
    saga = models.ForeignKey(SagaInstance, on_delete=models.CASCADE, related_name="steps", db_index=False)
    name = models.CharField(max_length=100)
    position = models.PositiveIntegerField()
    direction = models.CharField(max_length=10, choices=Direction.choices)
    state = models.CharField(max_length=10, choices=StepState.choices, default=StepState.PENDING)
    attempts = models.PositiveIntegerField(default=0)  # tries that reached an outcome
    deliveries = models.PositiveIntegerField(default=0)  # messages that started running
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)  # for staff: exception type, message and where it was raised
    # Why the step failed in words fit for the end user: a BusinessError's message; empty when the
    # failure was not a business refusal (what to tell the user then is the application's choice).
    reason = models.TextField(blank=True)
    # FAILED without a business refusal (retries exhausted, worker lost, abandoned): its effect
    # outside our database may have happened. See Step.compensate_uncertain.
    outcome_uncertain = models.BooleanField(default=False)
    result = models.JSONField(null=True, blank=True, encoder=DjangoJSONEncoder)

    class Meta:
        ordering = ["saga", "direction", "position"]
        constraints = [
            models.UniqueConstraint(fields=["saga", "name", "direction"], name="step_unique_per_direction"),
            models.CheckConstraint(condition=Q(state__in=StepState.values), name="step_state_valid"),
            models.CheckConstraint(condition=Q(attempts__lte=models.F("deliveries")), name="step_attempts_le_deliveries"),
        ]

    def __str__(self) -> str:
        return f"{self.name} {self.direction} ({self.state})"


class FaultKind(models.TextChoices):
    BUSINESS = "business"  # the action raises a BusinessError: no retry, compensate
    TRANSIENT = "transient"  # the action raises a TransientError: retried per policy
    CRASH = "crash"  # the worker process is SIGKILLed mid-step, before the step commits
    CRASH_AFTER_COMMIT = "crash_after_commit"  # SIGKILL after the step committed, before the ack
    DUPLICATE = "duplicate"  # the step's message is published a second time


class Fault(models.Model):
    """A fault to inject into a named step (tests and demos; see sagas.testing.inject_fault)."""

    saga_name = models.CharField(max_length=100)
    step = models.CharField(max_length=100)
    direction = models.CharField(max_length=10, choices=Direction.choices, default=Direction.FORWARD)
    kind = models.CharField(max_length=20, choices=FaultKind.choices)
    remaining = models.PositiveIntegerField(null=True, blank=True, help_text="empty: every time")
    saga = models.ForeignKey(SagaInstance, null=True, blank=True, on_delete=models.CASCADE)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.kind} in {self.saga_name}.{self.step} ({self.direction})"


class OutboxEvent(models.Model):
    """An event committed in the same transaction as the business change that caused it.

    `sequence` orders events (per aggregate, the relay publishes them in this order). The relay
    fields (published_at, attempts, next_attempt_at, last_error) are filled by the relay."""

    sequence = models.BigAutoField(primary_key=True)
    id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    aggregate_type = models.CharField(max_length=100)
    aggregate_id = models.CharField(max_length=100)
    event_type = models.CharField(max_length=100)
    payload = models.JSONField(default=dict, encoder=DjangoJSONEncoder)
    created_at = models.DateTimeField()
    published_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    # Parked after too many failed publishes; holds back only its own aggregate until replayed.
    dead_lettered_at = models.DateTimeField(null=True, blank=True)
    # When the event needed nothing more from the consumers' redelivery sweep: at publication when
    # no in-process consumer was sent it, else once each consumer it was sent to had handled it (or
    # it left the redelivery window). Null while the sweep watches it (sagas.consumers).
    consumed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["sequence"]
        permissions = [("replay_outboxevent", "Can replay outbox event from the dead letter")]
        indexes = [
            models.Index(fields=["aggregate_type", "aggregate_id", "sequence"], name="outbox_aggregate_idx"),
            models.Index(fields=["sequence"], condition=Q(published_at__isnull=True), name="outbox_unpublished_idx"),
            # Published events by when: the consumers' redelivery sweep (a window of the last day,
            # the types a consumer wants, checked in the index), outbox_cleanup (older than the
            # retention) and health's rate of the last minute, each without reading the retained
            # history. Unpublished events (just inserted) have no entry to maintain.
            models.Index(
                fields=["published_at", "event_type"], condition=Q(published_at__isnull=False), name="outbox_published_idx"
            ),
            # What the redelivery sweep watches: published events some consumer may still lack. Only
            # those are in it, so the sweep reads what is live, however many events are retained.
            models.Index(
                fields=["published_at", "sequence"],
                condition=Q(published_at__isnull=False, consumed_at__isnull=True),
                name="outbox_unconsumed_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.aggregate_type}:{self.aggregate_id}"


class InboxMessage(models.Model):
    """An event a consumer has handled, committed in the same transaction as the handler's
    effects: a second delivery of the same event to the same consumer finds it and does nothing."""

    consumer = models.CharField(max_length=100)
    event_id = models.UUIDField()
    event_type = models.CharField(max_length=100)
    received_at = models.DateTimeField()

    class Meta:
        ordering = ["-received_at"]
        constraints = [models.UniqueConstraint(fields=["consumer", "event_id"], name="inbox_once_per_consumer")]
        indexes = [models.Index(fields=["received_at"], name="inbox_received_idx")]  # retention, oldest first

    def __str__(self) -> str:
        return f"{self.consumer} <- {self.event_type} {self.event_id}"


class ConsumerDelivery(models.Model):
    """How often an event was delivered to a consumer, counted before the handler runs (and
    committed on its own), so a handler that kills its worker every time is given up on. Pruned
    with the consumer's inbox row for the event (sagas.retention)."""

    consumer = models.CharField(max_length=100)
    event_id = models.UUIDField()
    deliveries = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["consumer", "event_id"], name="consumer_delivery_once")]


class RejectedMessage(models.Model):
    """A message a worker could not take: undecodable, of an unknown shape or task, or with
    arguments that do not fit its task. It was rejected without requeue (so it cannot stop or
    loop the workers) and is kept here, cut to a few KB, for staff to look at."""

    received_at = models.DateTimeField(db_index=True)
    queue = models.CharField(max_length=200, blank=True)
    task = models.CharField(max_length=200, blank=True)
    reason = models.TextField()
    body = models.TextField(blank=True, help_text="the message as received, cut to MAX_BODY characters")

    MAX_BODY = 4096

    class Meta:
        ordering = ["-received_at", "-id"]

    def __str__(self) -> str:
        return f"{self.task or 'message'} on {self.queue or '?'}: {self.reason[:80]}"


class WorkerHeartbeat(models.Model):
    """Written every few seconds by each celery worker's main process (sagas.heartbeat): whether
    workers are alive, and whether they still take work (tasks accepted), for the health check."""

    hostname = models.CharField(max_length=200, unique=True)
    pid = models.PositiveIntegerField()
    queues = models.CharField(max_length=500, blank=True)
    started_at = models.DateTimeField()
    beat_at = models.DateTimeField(db_index=True)
    accepted = models.PositiveBigIntegerField(default=0, help_text="tasks accepted since the worker started")
    active = models.PositiveIntegerField(default=0, help_text="tasks in hand at the last beat")
    progress_at = models.DateTimeField(help_text="when it last accepted a task or finished one (or started)")

    class Meta:
        ordering = ["hostname"]

    def __str__(self) -> str:
        return f"{self.hostname} (beat {self.beat_at:%H:%M:%S})"


class OutboxStream(models.Model):
    """A Redis stream the relay writes (`events.<aggregate_type>`) and the newest entry it knows it
    wrote there, committed with the round that marked those events published. If that entry is
    gone from the stream, the stream lost entries (a Redis restart without persistence, the AOF's
    last second, a FLUSHALL) and the relay publishes the retained events again (sagas.streams)."""

    name = models.CharField(max_length=200, primary_key=True)
    aggregate_type = models.CharField(max_length=100)
    last_entry_id = models.CharField(max_length=40, blank=True, help_text="empty: nothing written yet")
    updated_at = models.DateTimeField()
    # One relay at a time re-publishes a stream: it holds the stream until this time (renewed as it
    # goes); one that dies leaves it to another after that.
    recovery_lease_until = models.DateTimeField(null=True, blank=True)
    recoveries = models.PositiveIntegerField(default=0, help_text="losses found and repaired")
    republished = models.PositiveBigIntegerField(default=0, help_text="events published again after a loss")
    last_recovered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ParkedDelivery(models.Model):
    """An event a consumer gave up on (its handler kept failing, refused it, or killed its worker
    every time): parked once, with the consumer's settlement run (Subscription.on_give_up), and
    not sent again unless an operator replays it. Its inbox row was written with it."""

    consumer = models.CharField(max_length=100)
    event_id = models.UUIDField()
    event_type = models.CharField(max_length=100)
    aggregate_type = models.CharField(max_length=100)
    aggregate_id = models.CharField(max_length=100)
    reason = models.TextField()
    parked_at = models.DateTimeField(db_index=True)
    settled = models.BooleanField(default=False, help_text="the consumer's on_give_up settlement ran")

    class Meta:
        ordering = ["-parked_at", "-id"]
        constraints = [models.UniqueConstraint(fields=["consumer", "event_id"], name="parked_once_per_consumer")]
        permissions = [("replay_parkeddelivery", "Can replay a parked consumer delivery")]

    def __str__(self) -> str:
        return f"{self.consumer} gave up on {self.event_type} {self.event_id}"


class HousekeepingRun(models.Model):
    """When each periodic task (the sweeper above all) last ran and what it did: health calls the
    system degraded when the sweeper stopped (beat or the control worker is down or stuck); a
    retention task that keeps stopping at its time budget is falling behind."""

    task = models.CharField(max_length=100, unique=True)
    ran_at = models.DateTimeField()
    count = models.PositiveBigIntegerField(default=0, help_text="what the last run did: sagas re-driven, deliveries sent, rows deleted")
    more = models.BooleanField(default=False, help_text="the last run stopped at its time budget with work left; the next one goes on")

    def __str__(self) -> str:
        return f"{self.task} at {self.ran_at:%H:%M:%S}"
