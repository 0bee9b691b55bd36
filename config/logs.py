"""Logging: the JSON format (LOG_FORMAT=json) and the filters of config.settings.LOGGING.

Celery's worker and beat log through the same configuration (config.celery connects
setup_logging), so Celery's own task lines come out in the same format, and carry the running
step's fields (sagas.log.StepContextFilter).
"""

from __future__ import annotations

import logging

import structlog

# Periodic housekeeping: each logs a line of its own when it did something. Celery's "received",
# "succeeded" and "discarding revoked" (an expired kick) lines for them go to DEBUG.
HOUSEKEEPING_TASKS = frozenset({"sagas.sweep", "sagas.relay_outbox", "sagas.outbox_cleanup", "sagas.consumers_redeliver"})
CELERY_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.worker.request")


def json_formatter() -> logging.Formatter:
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, the exception if any,
    and every extra field of the record (the step's saga_id, saga_name, saga_version, step,
    direction, delivery; a transition's state)."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            _without_celery_data,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="time"),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.EventRenamer("message"),
            structlog.processors.JSONRenderer(default=str),
        ],
    )


def _without_celery_data(logger, method_name, event_dict):
    """Celery hands its task lines the whole context as `data` (the arguments, and for an expected
    failure the traceback it chose not to log): the message says what matters."""
    event_dict.pop("data", None)
    return event_dict


class PlainFormatter(logging.Formatter):
    """The plain format; a line logged while a step runs that does not name its saga already (as
    Celery's own task lines do not) ends with the step's fields, e.g.
    `[saga=<id> name=place_order v=1 step=process_payment direction=forward delivery=1]`."""

    FIELDS = (("saga_id", "saga"), ("saga_name", "name"), ("saga_version", "v"), ("step", "step"), ("direction", "direction"), ("delivery", "delivery"))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        saga_id = getattr(record, "saga_id", None)
        if saga_id is None or f"saga={saga_id}" in line:
            return line
        fields = " ".join(f"{label}={getattr(record, name)}" for name, label in self.FIELDS if getattr(record, name, None) is not None)
        return f"{line} [{fields}]"


class QuietHousekeepingFilter(logging.Filter):
    """Celery's INFO lines about housekeeping tasks are DEBUG: an idle relay is silent at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name not in CELERY_TASK_LOGGERS or record.levelno != logging.INFO:
            return True
        data = record.args if isinstance(record.args, dict) else getattr(record, "data", None)
        if isinstance(data, dict):
            name = data.get("name")
        else:  # "Discarding revoked task: %s[%s]" (an expired relay kick), name first
            name = record.args[0] if isinstance(record.args, tuple) and record.args else None
        if name in HOUSEKEEPING_TASKS:
            if logging.getLogger().isEnabledFor(logging.DEBUG):
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return True
            return False
        return True
