"""Messages a worker refuses (DESIGN.md rule 12): logged with the body cut short, and recorded for
staff (RejectedMessage). Never raises: recording must not become a new way to stop a worker."""

from __future__ import annotations

import json
import logging

from django.db import DatabaseError, InterfaceError, OperationalError, connection
from django.utils import timezone

log = logging.getLogger("sagas")

LOG_BODY = 2048


def message_reject_record(*, reason: str, body, queue: str = "", task: str = "", close_connection: bool = False) -> None:
    """Log and record a rejected message. `body`: bytes, str or any JSON-able value.
    `close_connection`: the worker's main process records it and must not keep a connection its
    pool children would inherit."""
    from sagas.models import RejectedMessage

    text = _as_text(body)
    log.error(
        "message_rejected queue=%s task=%s reason=%s body=%r",
        queue or "?", task or "?", reason[:500], text[:LOG_BODY],
        extra={"event": "message_rejected", "queue": queue, "task": task},
    )
    row = RejectedMessage(
        received_at=timezone.now(), queue=queue[:200], task=task[:200], reason=reason[:2000], body=text[: RejectedMessage.MAX_BODY]
    )
    try:
        try:
            row.save(force_insert=True)
        except (OperationalError, InterfaceError):
            # Most often a connection the server cut since its last use (PostgreSQL restarted while
            # the worker idled): once more on a new one. Still failing: the database is down.
            connection.close()
            row.save(force_insert=True)
    except DatabaseError as exc:
        log.warning("message_rejected_not_recorded queue=%s: %s", queue or "?", type(exc).__name__)
    finally:
        if close_connection:
            connection.close()


def _as_text(body) -> str:
    if isinstance(body, bytes):
        text = body[: 4 * LOG_BODY * 2].decode("utf-8", errors="backslashreplace")
    elif isinstance(body, str):
        text = body
    else:
        try:
            text = json.dumps(body, default=repr)
        except (TypeError, ValueError):
            text = repr(body)
    # PostgreSQL text cannot hold a NUL byte; an attacker's message may.
    return text.replace("\x00", "\\x00")
