"""The engine's hot path as hand-written SQL: the statements every step delivery and every
outbox event make.

Through the ORM, building these statements costs several times what PostgreSQL takes to run
them (issue 11's profile: the delivery count 0.78 ms through the ORM, 0.11 ms as SQL). Each
function here is one statement (two on SQLite, which has no data-modifying WITH) and returns or
takes model instances, so the callers read like the ORM code they replace. Values pass through
the fields' own conversions (get_db_prep_save, the backend's converters), so what is written and
read is what the ORM would write and read. Tested in sagas/tests/test_sql.py on both backends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from uuid import UUID
from weakref import WeakKeyDictionary

from django.db import connection, connections
from django.db.models import Field, Model

from sagas.models import OutboxEvent, SagaInstance, SagaState, StepExecution, StepState

_SAGA = SagaInstance._meta.db_table
_STEP = StepExecution._meta.db_table
_RUNS_FORWARD = (SagaState.PENDING, SagaState.RUNNING)
_NO_OUTCOME = (StepState.PENDING, StepState.RUNNING, StepState.RETRYING)


def lock_saga_and_steps(saga_id: UUID | str, direction: str) -> tuple[SagaInstance, list[StepExecution]] | None:
    """The saga row and its step rows of `direction` (in position order), all locked in one
    statement: the saga row, then the steps in primary key order, as sagas.locks takes them.
    None when the saga has no step of that direction or does not exist (the caller tells which)."""
    saga_fields, step_fields = _fields(SagaInstance), _fields(StepExecution)
    columns = ", ".join([*(f"s.{_q(f.column)}" for f in saga_fields), *(f"e.{_q(f.column)}" for f in step_fields)])
    sql = (
        f"SELECT {columns} FROM {_q(_SAGA)} s JOIN {_q(_STEP)} e ON e.saga_id = s.id AND e.direction = %s "
        f"WHERE s.id = %s ORDER BY e.id"
    )
    if connection.features.has_select_for_update_of:
        sql += " FOR UPDATE OF s, e"
    with connection.cursor() as cursor:
        cursor.execute(sql, [direction, _saga_pk(saga_id)])
        rows = cursor.fetchall()
    if not rows:
        return None
    split = len(saga_fields)
    saga = _instance(SagaInstance, saga_fields, rows[0][:split])
    steps = [_instance(StepExecution, step_fields, row[split:]) for row in rows]
    for step in steps:
        step._state.fields_cache["saga"] = saga
    return saga, sorted(steps, key=lambda e: e.position)


def count_delivery(saga_id: UUID | str, step_name: str, direction: str, *, now: datetime) -> bool:
    """Count a delivery of a forward step and show it RUNNING, in one statement, when plainly
    nothing else need be decided: its saga runs forward, every earlier step COMPLETED, it has no
    outcome, and no earlier delivery died unfinished. False otherwise (the caller decides under
    the locks). Takes no saga lock: the UPDATE holds only the step row, for the statement.

    The step's own state is tested on the row itself (not through a join): a delivery that waited
    for the row lock while another completed the step must see COMPLETED as committed."""
    started = _prep(StepExecution, "started_at", now)
    sql = (
        f"UPDATE {_q(_STEP)} SET deliveries = deliveries + 1, state = %s, started_at = COALESCE(started_at, %s) "
        f"WHERE saga_id = %s AND name = %s AND direction = %s AND state IN (%s, %s, %s) AND deliveries = attempts "
        f"AND EXISTS (SELECT 1 FROM {_q(_SAGA)} s WHERE s.id = {_q(_STEP)}.saga_id AND s.state IN (%s, %s)) "
        f"AND NOT EXISTS (SELECT 1 FROM {_q(_STEP)} earlier WHERE earlier.saga_id = {_q(_STEP)}.saga_id "
        f"AND earlier.direction = {_q(_STEP)}.direction AND earlier.position < {_q(_STEP)}.position AND earlier.state <> %s)"
    )
    params = [StepState.RUNNING, started, _saga_pk(saga_id), step_name, direction, *_NO_OUTCOME, *_RUNS_FORWARD, StepState.COMPLETED]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount == 1


def save_step_and_saga(execution: StepExecution, step_fields: Sequence[str], saga: SagaInstance, saga_fields: Sequence[str]) -> None:
    """Write the named fields of a step row and of its saga row: one statement on PostgreSQL.
    Both rows must be locked by this transaction already."""
    step_sql, step_params = _update(execution, step_fields)
    saga_sql, saga_params = _update(saga, saga_fields)
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"WITH step AS ({step_sql}) {saga_sql}", [*step_params, *saga_params])
        else:
            cursor.execute(step_sql, step_params)
            cursor.execute(saga_sql, saga_params)


def outbox_insert(event: OutboxEvent, *, lock_key: str) -> OutboxEvent:
    """Insert an unsaved event after taking the transaction-scoped advisory lock `lock_key`, in
    one statement on PostgreSQL (the lock is taken before the row, and so before its sequence
    number). Other backends: a plain insert (SQLite's writers are serial already)."""
    if connection.vendor != "postgresql":
        event.save(force_insert=True)
        return event
    fields = [f for f in OutboxEvent._meta.concrete_fields if f is not OutboxEvent._meta.pk]
    columns = ", ".join(_q(f.column) for f in fields)
    values = [f.get_db_prep_save(f.pre_save(event, True), connection) for f in fields]
    placeholders = ", ".join(["%s"] * len(values))
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {_q(OutboxEvent._meta.db_table)} ({columns}) SELECT {placeholders} "
            f"FROM pg_advisory_xact_lock(hashtext(%s)) RETURNING {_q(OutboxEvent._meta.pk.column)}",
            [*values, lock_key],
        )
        event.pk = cursor.fetchone()[0]
    event._state.adding, event._state.db = False, connection.alias
    return event


def _update(instance: Model, names: Iterable[str]) -> tuple[str, list]:
    model = type(instance)
    meta = model._meta
    assignments, params = [], []
    for name in names:
        field = meta.get_field(name)
        assignments.append(f"{_q(field.column)} = %s")
        params.append(field.get_db_prep_save(getattr(instance, field.attname), connection))
    pk = meta.pk
    params.append(pk.get_db_prep_value(instance.pk, connection))
    return f"UPDATE {_q(meta.db_table)} SET {', '.join(assignments)} WHERE {_q(pk.column)} = %s", params


def _prep(model: type[Model], name: str, value):
    return model._meta.get_field(name).get_db_prep_save(value, connection)


def _saga_pk(saga_id: UUID | str):
    return SagaInstance._meta.pk.get_db_prep_value(saga_id if isinstance(saga_id, UUID) else UUID(str(saga_id)), connection)


def _q(name: str) -> str:
    return connection.ops.quote_name(name)


def _fields(model: type[Model]) -> list[Field]:
    return list(model._meta.concrete_fields)


# The backend's and the fields' converters of a model's columns (what the ORM applies to every
# value it reads: text to datetime and UUID on SQLite, JSON text to Python), per connection
# (django.db.connection is a proxy; connections[alias] is this thread's wrapper).
_converters: WeakKeyDictionary = WeakKeyDictionary()


def _instance(model: type[Model], fields: list[Field], values: Sequence) -> Model:
    per_connection = _converters.setdefault(connections[connection.alias], {})
    if model not in per_connection:
        per_connection[model] = [_column_converters(model, field) for field in fields]
    converted = []
    for value, (column, converters) in zip(values, per_connection[model], strict=True):
        for converter in converters:
            value = converter(value, column, connection)
        converted.append(value)
    return model.from_db(connection.alias, [f.attname for f in fields], converted)


def _column_converters(model: type[Model], field: Field):
    column = field.get_col(model._meta.db_table)
    return column, [*connection.ops.get_db_converters(column), *column.get_db_converters(connection)]
