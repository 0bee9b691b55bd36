"""What a Celery worker does with a message it cannot take (DESIGN.md rule 12): reject it without
requeue, record it (sagas.rejects), and go on consuming. Never "Unrecoverable error".

A message can break a worker at three depths, and each has its guard here:
  - the transport: an envelope that is not JSON, or JSON of another shape, raised out of kombu's
    Redis and SQLAlchemy channels into the event loop and the worker exited (the message, already
    popped, was gone with it). The transports below catch exactly that and drop the message;
  - the consumer: a task message whose headers or body Celery cannot turn into a request (a body
    `{"a": 1}` raised ValueError in the strategy; with one pool process the requeued message then
    killed every new worker). `WorkerConsumer` rejects it; Celery's own refusals (undecodable
    body, unknown task or format) are recorded too;
  - the task: arguments that do not fit the task are refused by `sagas.tasks.EngineTask`.

Installed by config.broker (transport aliases) and settings.CELERY_WORKER_CONSUMER.
"""

from __future__ import annotations

import json
from binascii import Error as BinasciiError

from celery.utils.log import get_logger
from celery.worker.consumer import Consumer
from kombu.transport import redis as kombu_redis
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from kombu.transport import virtual
from kombu.utils.encoding import safe_repr

log = get_logger("sagas")

# What a broken envelope raises while kombu decodes it (JSONDecodeError and UnicodeDecodeError
# are ValueErrors; a base64 body that is not base64 raises binascii.Error).
UNREADABLE = (ValueError, TypeError, KeyError, AttributeError, IndexError, BinasciiError)


class UnreadableMessage(Exception):
    """A broker message kombu could not turn into a Message."""

    def __init__(self, raw, error: BaseException):
        super().__init__(f"{type(error).__name__}: {error}")
        self.raw = raw


def _record(*, reason: str, body, queue: str = "", task: str = "") -> None:
    from sagas.rejects import message_reject_record

    message_reject_record(reason=reason, body=body, queue=queue, task=task, close_connection=True)


# --- the transports -------------------------------------------------------------------------------


class _ReadableMessageMixin:
    """A message whose envelope kombu cannot read raises UnreadableMessage, carrying it raw."""

    def __init__(self, payload, channel=None, **kwargs):
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except UNREADABLE as exc:
            raise UnreadableMessage(payload, exc) from exc


class _DeliverMixin:
    """Transport._deliver: a message kombu cannot read is recorded and dropped, not raised into
    the event loop. It was never handed to a consumer, so there is nothing to acknowledge."""

    def _deliver(self, message, queue):
        try:
            return super()._deliver(message, queue)
        except UnreadableMessage as exc:
            _record(reason=f"unreadable message envelope: {exc}", body=exc.raw, queue=queue or "")


def _undecodable(exc: BaseException):
    """The raw text or bytes behind a decoding error, when the error carries it."""
    return getattr(exc, "doc", None) or getattr(exc, "object", None) or ""


class ReadableMessage(_ReadableMessageMixin, virtual.Message):
    pass


class RedisChannel(kombu_redis.Channel):
    Message = ReadableMessage

    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except ValueError as exc:  # the popped item was not JSON (or not UTF-8): it is gone already
            queue = (getattr(self._queue_cycle, "items", None) or [""])[-1]  # rotated to the end just now
            _record(reason=f"message envelope is not JSON: {exc}", body=_undecodable(exc), queue=queue)
            return True

    def _get(self, queue):
        try:
            return super()._get(queue)
        except ValueError as exc:
            _record(reason=f"message envelope is not JSON: {exc}", body=_undecodable(exc), queue=queue)
            raise virtual.Empty() from None


class RedisTransport(_DeliverMixin, kombu_redis.Transport):
    Channel = RedisChannel


class SQLAlchemyChannel(kombu_sqlalchemy.Channel):
    Message = ReadableMessage

    def _get(self, queue):
        try:
            return super()._get(queue)
        except ValueError as exc:  # its row is marked invisible already: it is dropped
            _record(reason=f"message envelope is not JSON: {exc}", body=_undecodable(exc), queue=queue)
            raise virtual.Empty() from None


class SQLAlchemyTransport(_DeliverMixin, kombu_sqlalchemy.Transport):
    Channel = SQLAlchemyChannel


# --- the consumer --------------------------------------------------------------------------------


def _message_text(message) -> str:
    body = message.body
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="backslashreplace")
    try:
        headers = json.dumps(message.headers, default=repr)
    except (TypeError, ValueError):
        headers = safe_repr(message.headers)
    return f"headers={headers} body={body}"


def _queue_of(message) -> str:
    info = getattr(message, "delivery_info", None) or {}
    return str(info.get("routing_key") or info.get("queue") or "")


def _task_of(message) -> str:
    headers = message.headers if isinstance(getattr(message, "headers", None), dict) else {}
    return str(headers.get("task") or "")


def _task_message_problem(message) -> str:
    """What makes a task message (protocol 2) unfit to run, found before Celery acts on it: a
    malformed time limit reached the pool's timer thread and stopped the worker, and a body that is
    not [args, kwargs, embed] fails deep inside. "" when fit, or when Celery's own checks (an
    undecodable or refused body, a message that is not a task) should report it."""
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return ""
    limits = headers.get("timelimit")
    if limits is not None and not (
        isinstance(limits, (list, tuple)) and len(limits) == 2
        and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0) for v in limits)
    ):
        return f"header timelimit must be [soft, hard] seconds or null, not {str(limits)[:80]!r}"
    if not isinstance(headers.get("id"), str):
        return "header id must be the task id"
    try:
        body = message.payload
    except Exception:  # noqa: BLE001 - Celery's decode and content checks report these themselves
        return ""
    if not (isinstance(body, (list, tuple)) and len(body) == 3):
        return "the task message body must be [args, kwargs, embed]"
    args, kwargs, embed = body
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict) or not isinstance(embed, (dict, type(None))):
        return "the task message body must be [args (a list), kwargs (an object), embed (an object)]"
    for name in ("callbacks", "errbacks", "chain"):
        linked = (embed or {}).get(name)
        if linked is not None and not (isinstance(linked, list) and all(isinstance(sig, dict) for sig in linked)):
            return f"embed {name} must be a list of signatures"
    return ""


class WorkerConsumer(Consumer):
    """settings.CELERY_WORKER_CONSUMER: Celery's consumer, made to survive what it is sent."""

    def create_task_handler(self, *args, **kwargs):
        handle = super().create_task_handler(*args, **kwargs)
        fatal = self._connection_failures()

        def on_task_received(message):
            problem = _task_message_problem(message)
            if problem:
                self._reject(message, problem)
                return None
            try:
                return handle(message)
            except fatal:
                raise  # the broker connection broke: Celery reconnects
            except Exception as exc:  # noqa: BLE001 - the worker's boundary: any message, however built
                self._reject(message, f"{type(exc).__name__} while reading the task message: {exc}")

        return on_task_received

    def _connection_failures(self) -> tuple[type[BaseException], ...]:
        """The transport's connection and channel errors, without the builtin ones kombu lists there
        (Redis counts KeyError as a connection error): a message's own defects must not look like a
        lost connection, whose recovery would put the message back and fail on it again."""
        errors = (*self.connection_errors, *self.channel_errors)
        return tuple(e for e in errors if e.__module__ != "builtins" or issubclass(e, OSError))

    def _reject(self, message, reason: str) -> None:
        _record(reason=reason, body=_message_text(message), queue=_queue_of(message), task=_task_of(message))
        if not message.acknowledged:
            message.reject(requeue=False)

    def on_decode_error(self, message, exc):
        _record(reason=f"cannot decode the message body: {exc}", body=_message_text(message), queue=_queue_of(message), task=_task_of(message))
        super().on_decode_error(message, exc)

    def on_unknown_message(self, body, message):
        _record(reason="not a task message (no task name)", body=_message_text(message), queue=_queue_of(message))
        super().on_unknown_message(body, message)

    def on_unknown_task(self, body, message, exc):
        _record(reason=f"unknown task: {exc}", body=_message_text(message), queue=_queue_of(message), task=_task_of(message))
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body, message, exc):
        _record(reason=f"invalid task message: {exc}", body=_message_text(message), queue=_queue_of(message), task=_task_of(message))
        super().on_invalid_task(body, message, exc)

    def on_connection_error_after_connected(self, exc):
        # As in Celery 5.6 when the broker connection is lost: the dead connection is collected, not
        # also closed. Celery 5.7.0 closes it after collecting it; with Redis, closing the channel
        # tries to put the unacknowledged messages back and acking a task that finishes afterwards
        # reaches for the channel's pool; both go through a transport whose client the collect
        # removed, raise AttributeError, and the worker exits (found by `make chaos`, kept by
        # tests/test_saga_recovery.py::test_a_worker_survives_its_redis_broker_restarting_while_it_holds_a_message).
        # Left alone, the unacknowledged messages come back after the visibility timeout (or are
        # gone with a Redis that restarted empty; the sweeper covers that).
        if self.connection is not None:
            self.connection.close = lambda: None  # this connection object only; it is dropped next
        super().on_connection_error_after_connected(exc)


# --- the database connection between tasks ----------------------------------------------------------


def reset_connections_left_in_a_transaction() -> list[str]:
    """Before a task: replace any database connection that is still inside a transaction. No task
    starts inside one; a previous task left it there when an exception raised asynchronously (the
    soft time limit) landed inside Django's transaction bookkeeping. Such a connection only ever
    makes savepoints, so its writes are never committed, and once closed it cannot be dropped:
    every later task on that pool process failed with 'the connection is closed' (found by
    `make chaos`). Returns the aliases it reset."""
    from django.db import connections

    reset = []
    for conn in connections.all(initialized_only=True):
        if not conn.in_atomic_block:
            continue
        log.error("db_connection_reset alias=%s: a task started inside a transaction a previous task left open; reconnecting", conn.alias)
        try:
            if conn.connection is not None:
                conn.connection.close()  # the server rolls the open transaction back
        except Exception:  # noqa: BLE001 - closing a connection that is broken anyway
            pass
        # What connect() clears, cleared now: the next atomic block must begin a transaction, not
        # a savepoint. The next query connects afresh.
        conn.connection = None
        conn.in_atomic_block, conn.needs_rollback, conn.closed_in_transaction = False, False, False
        conn.savepoint_ids, conn.atomic_blocks = [], []
        reset.append(conn.alias)
    return reset
