"""The engine's hot path as hand-written SQL: the statements every step delivery and every
outbox event make.

Through the ORM, building these statements costs several times what PostgreSQL takes to run
them (issue 11's profile: the delivery count 0.78 ms through the ORM, 0.11 ms as SQL). Each
function here is one statement (two on SQLite, which has no data-modifying WITH) and returns or
takes model instances, so the callers read like the ORM code they replace. Values pass through
the fields' own conversions (get_db_prep_save, the backend's converters), so what is written and
read is what the ORM would write and read. Statements are built once per backend (`_Shapes`).
Tested in sagas/tests/test_sql.py on both backends.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.transaction import TransactionManagementError
from django.db.models import Field, Model

from sagas.models import ConsumerDelivery, InboxMessage, OutboxEvent, SagaInstance, SagaState, StepExecution, StepState
from sagas.waits import SET_LIMITS, step_limits

_RUNS_FORWARD = (SagaState.PENDING, SagaState.RUNNING)
_NO_OUTCOME = (StepState.PENDING, StepState.RUNNING, StepState.RETRYING)


def lock_saga_and_steps(
    saga_id: UUID | str, direction: str, *, limit_timeout: float | None = None
) -> tuple[SagaInstance, list[StepExecution]] | None:
    """The saga row and its step rows of `direction` (in position order), all locked in one
    statement: the saga row, then the steps in primary key order, as sagas.locks takes them.
    None when the saga has no step of that direction or does not exist (the caller tells which).

    `limit_timeout` (PostgreSQL): the same statement first sets the transaction's wait limits for
    a step of that timeout (sagas.waits), before it waits for any of the locks: the rows reach
    the locking node only through the join with the limits. They are set when rows come back."""
    conn = connections[DEFAULT_DB_ALIAS]
    shapes = _shapes(conn)
    statement, params = shapes.lock, [direction, _saga_pk(saga_id, conn)]
    if limit_timeout is not None and conn.vendor == "postgresql":
        statement, params = shapes.lock_limited, [*step_limits(limit_timeout), *params]
    with conn.cursor() as cursor:
        cursor.execute(statement, params)
        rows = cursor.fetchall()
    if not rows:
        return None
    split = len(shapes.saga_fields)
    saga = _instance(SagaInstance, shapes.saga_fields, rows[0][:split], conn)
    steps = [_instance(StepExecution, shapes.step_fields, row[split:], conn) for row in rows]
    for step in steps:
        step._state.fields_cache["saga"] = saga
    steps.sort(key=lambda e: e.position)
    return saga, steps


def count_delivery(saga_id: UUID | str, step_name: str, direction: str, *, now: datetime) -> bool:
    """Count a delivery of a forward step and show it RUNNING, in one statement, when plainly
    nothing else need be decided: its saga runs forward, every earlier step COMPLETED, it has no
    outcome, and no earlier delivery died unfinished. False otherwise (the caller decides under
    the locks). Takes no saga lock: the UPDATE holds only the step row, for the statement.

    The step's own state is tested on the row itself (not through a join): a delivery that waited
    for the row lock while another completed the step must see COMPLETED as committed."""
    conn = connections[DEFAULT_DB_ALIAS]
    started = StepExecution._meta.get_field("started_at").get_db_prep_save(now, conn)
    params = [StepState.RUNNING, started, _saga_pk(saga_id, conn), step_name, direction, *_NO_OUTCOME, *_RUNS_FORWARD, StepState.COMPLETED]
    with conn.cursor() as cursor:
        cursor.execute(_shapes(conn).count_delivery, params)
        return cursor.rowcount == 1


def save_step_and_saga(execution: StepExecution, step_fields: Sequence[str], saga: SagaInstance, saga_fields: Sequence[str]) -> None:
    """Write the named fields of a step row and of its saga row: one statement on PostgreSQL.
    Both rows must be locked by this transaction already."""
    conn = connections[DEFAULT_DB_ALIAS]
    step_sql, saga_sql = _update_sql(StepExecution, tuple(step_fields), conn), _update_sql(SagaInstance, tuple(saga_fields), conn)
    step_params, saga_params = _update_params(execution, step_fields, conn), _update_params(saga, saga_fields, conn)
    with conn.cursor() as cursor:
        if conn.vendor == "postgresql":
            cursor.execute(f"WITH step AS ({step_sql}) {saga_sql}", [*step_params, *saga_params])
        else:
            cursor.execute(step_sql, step_params)
            cursor.execute(saga_sql, saga_params)


def outbox_insert(event: OutboxEvent, *, lock_key: str) -> OutboxEvent:
    """Insert an unsaved event after taking the transaction-scoped advisory lock `lock_key`, in
    one statement on PostgreSQL (the lock is taken before the row, and so before its sequence
    number). Other backends: a plain insert (SQLite's writers are serial already)."""
    conn = connections[DEFAULT_DB_ALIAS]
    if conn.vendor != "postgresql":
        event.save(force_insert=True)
        return event
    shapes = _shapes(conn)
    values = [f.get_db_prep_save(f.pre_save(event, True), conn) for f in shapes.outbox_fields]
    with conn.cursor() as cursor:
        cursor.execute(shapes.outbox_insert, [*values, lock_key])
        event.pk = cursor.fetchone()[0]
    event._state.adding, event._state.db = False, conn.alias
    return event


def outbox_lock_due(sequences: Sequence[int], *, now: datetime) -> list[OutboxEvent]:
    """Those of these events (by sequence) that are still due at `now` (unpublished, not parked,
    not leased or backing off), row-locked, every field loaded, oldest first; rows another
    transaction holds are left out (SKIP LOCKED), and the due check is made again on each row's
    latest version once locked. Inside transaction.atomic (SQLite: no row locks, its writers are
    serial).

    The rows are named as `sequence = ANY(array)`: one parameter, so the statement's text never
    changes, and an index condition on the key of every index that could serve it, so it reads
    these rows and no others whatever the statistics say (a join or anti-join with the unpublished
    events is what the planner misjudges when its statistics predate a backlog; see sagas.relay)."""
    if not sequences:
        return []
    conn = connections[DEFAULT_DB_ALIAS]
    shapes = _shapes(conn)
    when = OutboxEvent._meta.get_field("next_attempt_at").get_db_prep_save(now, conn)
    with conn.cursor() as cursor:
        cursor.execute(shapes.outbox_lock_due, [_sequences(sequences, conn), when])
        rows = cursor.fetchall()
    return [_instance(OutboxEvent, shapes.outbox_all_fields, row, conn) for row in rows]


def outbox_update(sequences: Sequence[int], *, unpublished_only: bool = False, **values) -> int:
    """Set these fields (name=value) of these events (by sequence, as outbox_lock_due names them),
    or only of those still unpublished; returns how many rows. One statement."""
    if not sequences:
        return 0
    conn = connections[DEFAULT_DB_ALIAS]
    meta, q = OutboxEvent._meta, conn.ops.quote_name
    names = tuple(sorted(values))
    key = ("outbox_update", names, unpublished_only, conn.vendor)
    if key not in _by_vendor:
        assignments = ", ".join(f"{q(meta.get_field(name).column)} = %s" for name in names)
        statement = f"UPDATE {q(meta.db_table)} SET {assignments} WHERE {q(meta.pk.column)} {_shapes(conn).in_array}"
        _by_vendor[key] = statement + " AND published_at IS NULL" if unpublished_only else statement
    params = [meta.get_field(name).get_db_prep_save(values[name], conn) for name in names]
    with conn.cursor() as cursor:
        cursor.execute(_by_vendor[key], [*params, _sequences(sequences, conn)])
        return cursor.rowcount


def inbox_claim(*, consumer: str, event_id: str, event_type: str, received_at: datetime) -> bool:
    """Write the consumer's inbox row for this event unless there is one: True when written
    (in this transaction, which then owns it), False for a duplicate. One statement, no savepoint."""
    conn = connections[DEFAULT_DB_ALIAS]
    meta = InboxMessage._meta
    received = meta.get_field("received_at").get_db_prep_save(received_at, conn)
    with conn.cursor() as cursor:
        cursor.execute(_shapes(conn).inbox_claim, [consumer, meta.get_field("event_id").get_db_prep_save(event_id, conn), event_type, received])
        return cursor.rowcount == 1


def consumer_delivery_count(*, consumer: str, event_id: str, deaths: int) -> int:
    """Count a delivery of this event to this consumer (and `deaths` earlier deliveries the broker
    tells of, unless the count shows one already) and return the count. Commits with the caller's
    transaction, or at once outside one."""
    conn = connections[DEFAULT_DB_ALIAS]
    shapes = _shapes(conn)
    key = [consumer, ConsumerDelivery._meta.get_field("event_id").get_db_prep_save(event_id, conn)]
    with conn.cursor() as cursor:
        cursor.execute(shapes.consumer_delivery_count, [*key, 1 + deaths, deaths])
        if conn.vendor == "postgresql":
            return cursor.fetchone()[0]
        cursor.execute(shapes.consumer_delivery_read, key)
        return cursor.fetchone()[0]


@contextlib.contextmanager
def savepoints_off(what: str = "this work"):
    """Atomic blocks opened inside make no savepoint, on every backend alike: Django's atomic asks
    the connection whether one is allowed, and this connection answers "no" until the block ends
    (an instance attribute over the backend's method; deleted, the method answers again). For
    work inside a transaction that rolls back whole when anything in it raises (a saga step, a
    consumer's handler), where each savepoint would only cost two round trips."""
    conn = connections[DEFAULT_DB_ALIAS]
    conn._savepoint_allowed = _never
    try:
        yield
    except TransactionManagementError as exc:
        raise TransactionManagementError(
            f"{exc} ({what} runs without savepoints: an error inside one of its atomic blocks rolls all of it back; "
            "code that catches such errors and goes on needs savepoints=True)"
        ) from exc
    finally:
        del conn._savepoint_allowed


def _never() -> bool:
    return False


class _Shapes:
    """The statements of one backend, built once."""

    def __init__(self, conn) -> None:
        vendor, q = conn.vendor, conn.ops.quote_name
        saga, step, outbox = SagaInstance._meta, StepExecution._meta, OutboxEvent._meta
        self.saga_fields: list[Field] = list(saga.concrete_fields)
        self.step_fields: list[Field] = list(step.concrete_fields)
        columns = ", ".join([*(f"s.{q(f.column)}" for f in self.saga_fields), *(f"e.{q(f.column)}" for f in self.step_fields)])
        self.lock = (
            f"SELECT {columns} FROM {q(saga.db_table)} s JOIN {q(step.db_table)} e ON e.saga_id = s.id AND e.direction = %s "
            f"WHERE s.id = %s ORDER BY e.id"
        )
        if conn.features.has_select_for_update_of:
            self.lock += " FOR UPDATE OF s, e"
        # A materialized CTE is computed once, before the join hands a row up to FOR UPDATE.
        self.lock_limited = f"WITH limits AS MATERIALIZED (SELECT {SET_LIMITS}) " + self.lock.replace(
            f"FROM {q(saga.db_table)} s", f"FROM limits, {q(saga.db_table)} s", 1
        )
        t = q(step.db_table)
        self.count_delivery = (
            f"UPDATE {t} SET deliveries = deliveries + 1, state = %s, started_at = COALESCE(started_at, %s) "
            f"WHERE saga_id = %s AND name = %s AND direction = %s AND state IN (%s, %s, %s) AND deliveries = attempts "
            f"AND EXISTS (SELECT 1 FROM {q(saga.db_table)} s WHERE s.id = {t}.saga_id AND s.state IN (%s, %s)) "
            f"AND NOT EXISTS (SELECT 1 FROM {t} earlier WHERE earlier.saga_id = {t}.saga_id "
            f"AND earlier.direction = {t}.direction AND earlier.position < {t}.position AND earlier.state <> %s)"
        )
        inbox, counts = InboxMessage._meta, ConsumerDelivery._meta
        self.inbox_claim = (
            f"INSERT INTO {q(inbox.db_table)} (consumer, event_id, event_type, received_at) VALUES (%s, %s, %s, %s) "
            f"ON CONFLICT (consumer, event_id) DO NOTHING"
        )
        c = q(counts.db_table)
        self.consumer_delivery_count = (
            f"INSERT INTO {c} (consumer, event_id, deliveries) VALUES (%s, %s, %s) ON CONFLICT (consumer, event_id) "
            f"DO UPDATE SET deliveries = {c}.deliveries + 1 + CASE WHEN {c}.deliveries = 0 THEN %s ELSE 0 END"
        )
        if vendor == "postgresql":
            self.consumer_delivery_count += " RETURNING deliveries"
        self.consumer_delivery_read = f"SELECT deliveries FROM {c} WHERE consumer = %s AND event_id = %s"
        # A list of sequence numbers as one parameter: an array, or a JSON array SQLite reads.
        self.in_array = "= ANY(%s)" if vendor == "postgresql" else "IN (SELECT value FROM json_each(%s))"
        self.outbox_all_fields: list[Field] = list(outbox.concrete_fields)
        self.outbox_lock_due = (
            f"SELECT {', '.join(q(f.column) for f in self.outbox_all_fields)} FROM {q(outbox.db_table)} "
            f"WHERE {q(outbox.pk.column)} {self.in_array} AND published_at IS NULL AND dead_lettered_at IS NULL "
            f"AND (next_attempt_at IS NULL OR next_attempt_at <= %s) ORDER BY {q(outbox.pk.column)}"
        )
        if conn.features.has_select_for_update_skip_locked:
            self.outbox_lock_due += " FOR UPDATE SKIP LOCKED"
        self.outbox_fields: list[Field] = [f for f in outbox.concrete_fields if f is not outbox.pk]
        placeholders = ", ".join(["%s"] * len(self.outbox_fields))
        self.outbox_insert = (
            f"INSERT INTO {q(outbox.db_table)} ({', '.join(q(f.column) for f in self.outbox_fields)}) SELECT {placeholders} "
            f"FROM pg_advisory_xact_lock(hashtext(%s)) RETURNING {q(outbox.pk.column)}"
        )


_by_vendor: dict = {}


def _shapes(conn) -> _Shapes:
    """The statements of `conn`'s backend, built on first use."""
    key = ("shapes", conn.vendor)
    if key not in _by_vendor:
        _by_vendor[key] = _Shapes(conn)
    return _by_vendor[key]


def _update_sql(model: type[Model], names: tuple[str, ...], conn) -> str:
    key = ("update", model, names, conn.vendor)
    if key not in _by_vendor:
        q, meta = conn.ops.quote_name, model._meta
        assignments = ", ".join(f"{q(meta.get_field(name).column)} = %s" for name in names)
        _by_vendor[key] = f"UPDATE {q(meta.db_table)} SET {assignments} WHERE {q(meta.pk.column)} = %s"
    return _by_vendor[key]


def _update_params(instance: Model, names: Sequence[str], conn) -> list:
    meta = instance._meta
    params = []
    for name in names:
        field = meta.get_field(name)
        params.append(field.get_db_prep_save(getattr(instance, field.attname), conn))
    params.append(meta.pk.get_db_prep_value(instance.pk, conn))
    return params


def _sequences(sequences: Sequence[int], conn):
    values = [int(sequence) for sequence in sequences]
    return values if conn.vendor == "postgresql" else json.dumps(values)


def _saga_pk(saga_id: UUID | str, conn):
    return SagaInstance._meta.pk.get_db_prep_value(saga_id if isinstance(saga_id, UUID) else UUID(str(saga_id)), conn)


def _instance(model: type[Model], fields: list[Field], values: Sequence, conn) -> Model:
    """A model instance from a row of `fields`, each value converted as the ORM converts it (text
    to datetime and UUID on SQLite, JSON text to Python: the backend's and the fields' converters)."""
    values = list(values)
    for index, column, converters in _converters(model, conn):
        value = values[index]
        for converter in converters:
            value = converter(value, column, conn)
        values[index] = value
    return model.from_db(conn.alias, [f.attname for f in fields], values)


def _converters(model: type[Model], conn) -> list:
    """(index, column, converters) for each column of `model` that has converters, per connection
    object (a thread's own), cached on it."""
    cache = conn.__dict__.setdefault("_sagas_sql_converters", {})
    if model not in cache:
        entries = []
        for index, field in enumerate(model._meta.concrete_fields):
            column = field.get_col(model._meta.db_table)
            converters = [*conn.ops.get_db_converters(column), *column.get_db_converters(conn)]
            if converters:
                entries.append((index, column, converters))
        cache[model] = entries
    return cache[model]
