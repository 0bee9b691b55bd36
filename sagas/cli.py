"""The saga log as `manage.py sagas` prints it: tables that read at 100 columns, a saga's timeline
with times to the millisecond and durations, a bar picture of it on one time axis, and the same
facts as JSON for scripts. Rendering only: the command reads through sagas.selectors and acts
through sagas.services, as the staff API and the admin do.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Sequence
from datetime import datetime, timedelta

from django.core.serializers.json import DjangoJSONEncoder
from django.utils import timezone

from sagas.definition import get_definition
from sagas.exceptions import UnknownSagaDefinition
from sagas.models import ACTIVE_STATES, Direction, SagaInstance, StepExecution, StepState

ELLIPSIS = "…"
DIRECTIONS = {Direction.FORWARD: "fwd", Direction.COMPENSATE: "undo"}
BARS = {StepState.COMPLETED: "=", StepState.FAILED: "x", StepState.RUNNING: "~", StepState.RETRYING: "~"}
LEGEND = "= completed  x failed  ~ running or retrying"
# How sagas.services words a saga's failure reason, and the runner where an error was raised.
SHORT_REASONS = [
    (re.compile(r"\bstep (\S+) failed: "), r"\1: "),
    (re.compile(r"\bcompensation (\S+) failed: "), r"undo \1: "),
    (re.compile(r" \(at [^()]*:\d+\)"), ""),
]


# --- small formatting helpers -----------------------------------------------------------------------


def clip(text, width: int) -> str:
    """`text` on one line of at most `width` characters, cut with an ellipsis."""
    text = str(text).replace("\r\n", " ").replace("\n", " ").replace("\r", " ").replace("\t", " ")
    if len(text) <= width:
        return text
    return text[: max(width - 1, 0)] + ELLIPSIS if width > 0 else ""


def moment(value: datetime | None, *, on: datetime | None = None) -> str:
    """Local time to the millisecond, '2026-11-25 14:48:03.123'; only '14:48:03.123' when it falls
    on the same day as `on`, '11-26 09:00:00.000' on another day; '-' for none."""
    if value is None:
        return "-"
    local = timezone.localtime(value)
    if on is None:
        layout = "%Y-%m-%d %H:%M:%S.%f"
    elif local.date() == timezone.localtime(on).date():
        layout = "%H:%M:%S.%f"
    else:
        layout = "%m-%d %H:%M:%S.%f"
    return local.strftime(layout)[:-3]


def span(delta: timedelta) -> str:
    """A duration as a person reads it: '742 ms', '3.204 s', '2m 05s', '4h 12m', '3d 02h'."""
    ms = max(0, round(delta.total_seconds() * 1000))
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.3f} s"
    seconds = ms // 1000
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86_400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86_400}d {seconds % 86_400 // 3600:02d}h"


def age(delta: timedelta) -> str:
    """How long ago, to the unit that matters: '42s', '12m', '5h', '3d'."""
    seconds = max(0, int(delta.total_seconds()))
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def took(start: datetime | None, end: datetime | None) -> str:
    return span(end - start) if start and end else "-"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, width: int, flexible: int, right: Sequence[int] = ()) -> list[str]:
    """Columns as wide as their widest cell, two spaces apart; column `flexible` is cut (with an
    ellipsis) so that a line fits in `width`; the columns in `right` are aligned right."""
    widths = [max(len(row[n]) for row in (header, *rows)) for n in range(len(header))]
    fixed = sum(w for n, w in enumerate(widths) if n != flexible) + 2 * (len(widths) - 1)
    widths[flexible] = max(len(header[flexible]), min(widths[flexible], width - fixed))
    lines = []
    for row in (header, *rows):
        cells = [clip(cell, w) if n == flexible else cell for n, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(c.rjust(w) if n in right else c.ljust(w) for n, (c, w) in enumerate(zip(cells, widths))).rstrip())
    return lines


# --- a page of sagas ------------------------------------------------------------------------------


def saga_list_lines(sagas: Sequence[SagaInstance], last_errors: dict, *, now: datetime, width: int) -> list[str]:
    """One line per saga: id, name and version, state, age, and why it failed or what failed last."""
    rows = [
        (str(s.id), f"{s.name} v{s.version}", s.state, age(now - s.created_at), _in_short(trouble(s, last_errors.get(s.id))))
        for s in sagas
    ]
    return table(("id", "saga", "state", "age", "reason"), rows, width=width, flexible=4, right=(3,))


def _in_short(reason: str) -> str:
    """A failure reason cut down for a column: "step ship failed: X" -> "ship: X", "compensation
    charge failed: X" -> "undo charge: X", and without where the error was raised (`show` has it)."""
    for pattern, replacement in SHORT_REASONS:
        reason = pattern.sub(replacement, reason)
    return reason


def trouble(saga: SagaInstance, last_error: tuple[str, str, str] | None) -> str:
    """The saga's failure reason; or, for one that has none (yet), its latest step error."""
    if saga.failure_reason:
        return saga.failure_reason
    if last_error:
        name, direction, error = last_error
        return f"{name} ({DIRECTIONS.get(direction, direction)}): {error}"
    return ""


def saga_summary(saga: SagaInstance, last_error: tuple[str, str, str] | None = None) -> dict:
    """The saga row as JSON-ready data (field names as in the staff API)."""
    return {
        "id": str(saga.id),
        "name": saga.name,
        "version": saga.version,
        "state": saga.state,
        "failure_reason": saga.failure_reason,
        "last_error": trouble(saga, last_error) if not saga.failure_reason else "",
        "idempotency_key": saga.idempotency_key,
        "created_at": saga.created_at,
        "updated_at": saga.updated_at,
        "finished_at": saga.finished_at,
        "deadline_at": saga.deadline_at,
        "stuck_after": saga.stuck_after,
        "redrives": saga.redrives,
    }


# --- one saga ----------------------------------------------------------------------------------------


def definition_status(saga: SagaInstance) -> tuple[bool, str]:
    """(registered here?, what an operator should know about the saga's definition in this process)."""
    try:
        definition = get_definition(saga.name, saga.version)
    except UnknownSagaDefinition:
        return False, f"{saga.name} v{saga.version} is NOT registered in this process: it cannot go on or be operated here"
    if saga.definition_fingerprint and saga.definition_fingerprint != definition.fingerprint:
        return True, (
            f"{saga.name} v{saga.version} is registered, but CHANGED since the saga started "
            f"({saga.definition_fingerprint[:12]} -> {definition.fingerprint[:12]}): see `manage.py sagas versions`"
        )
    return True, f"{saga.name} v{saga.version}, registered here (fingerprint {definition.fingerprint[:12]})"


def saga_detail(saga: SagaInstance, steps: Sequence[StepExecution], *, now: datetime) -> dict:
    """Everything `sagas show --json` prints: the saga, its definition here, and its timeline."""
    registered, definition = definition_status(saga)
    return {
        **saga_summary(saga),
        "input": saga.input,
        "definition_fingerprint": saga.definition_fingerprint,
        "definition_registered": registered,
        "definition": definition,
        "stuck": is_stuck(saga, now=now),
        "steps": [step_detail(saga, e) for e in steps],
    }


def step_detail(saga: SagaInstance, execution: StepExecution) -> dict:
    started, finished = execution.started_at, execution.finished_at
    return {
        "name": execution.name,
        "direction": execution.direction,
        "position": execution.position,
        "state": execution.state,
        "attempts": execution.attempts,
        "deliveries": execution.deliveries,
        "started_at": started,
        "finished_at": finished,
        "duration_ms": round((finished - started).total_seconds() * 1000, 3) if started and finished else None,
        "result": execution.result,
        "error": execution.last_error,
        "reason": execution.reason,
        "outcome_uncertain": execution.outcome_uncertain,
        "idempotency_key": f"{saga.id}:{execution.name}",
    }


def is_stuck(saga: SagaInstance, *, now: datetime) -> bool:
    """As sagas.selectors.sagas_stuck decides it, for a saga in hand."""
    return saga.state in ACTIVE_STATES and saga.stuck_after is not None and saga.stuck_after < now


def saga_lines(saga: SagaInstance, steps: Sequence[StepExecution], *, now: datetime, width: int) -> list[str]:
    """The saga (what it is, when, why it failed), its timeline table and its picture."""
    return [
        *_heading(saga, now=now, width=width),
        "",
        *timeline_lines(saga, steps, width=width),
        "",
        *picture_lines(saga, steps, now=now, width=width),
    ]


def _heading(saga: SagaInstance, *, now: datetime, width: int) -> list[str]:
    _, definition = definition_status(saga)
    finished = f"{moment(saga.finished_at)} ({took(saga.created_at, saga.finished_at)} after it was created)" if saga.finished_at else "-"
    fields = [
        ("created", moment(saga.created_at)),
        ("updated", moment(saga.updated_at)),
        ("finished", finished),
        ("deadline", moment(saga.deadline_at)),
        ("stuck after", _stuck_after(saga, now=now)),
        ("re-drives", str(saga.redrives)),
        ("key", saga.idempotency_key or "-"),
        ("input", _json_line(saga.input)),
    ]
    lines = [clip(f"saga {saga.id}  {saga.name} v{saga.version}  {saga.state}", width)]
    lines += _wrapped("  definition  ", definition, width=width)
    lines += [clip(f"  {label:<12}{value}", width) for label, value in fields]
    if saga.failure_reason:
        lines += _wrapped("  failure     ", saga.failure_reason, width=width)
    return lines


def _stuck_after(saga: SagaInstance, *, now: datetime) -> str:
    if saga.stuck_after is None or saga.state not in ACTIVE_STATES:
        return "-"
    if saga.stuck_after < now:
        return f"{moment(saga.stuck_after)} (STUCK for {span(now - saga.stuck_after)}: the sweeper re-drives it)"
    return f"{moment(saga.stuck_after)} (in {span(saga.stuck_after - now)}, if it makes no progress)"


def timeline_lines(saga: SagaInstance, steps: Sequence[StepExecution], *, width: int) -> list[str]:
    """Each step and compensation in the order they started (not started yet: last), with tries,
    deliveries, start, finish and duration; its result and last error below it."""
    zone = timezone.get_current_timezone_name()
    lines = [f"timeline (times {zone} on {timezone.localtime(saga.created_at):%Y-%m-%d} unless a date is shown)"]
    if not steps:
        return [*lines, "  (no steps recorded)"]
    header = ("#", "step", "dir", "state", "att", "del", "started", "finished", "took")
    rows = [
        (
            str(n) if e.started_at else "-",
            e.name,
            DIRECTIONS.get(e.direction, e.direction),
            e.state,
            str(e.attempts),
            str(e.deliveries),
            moment(e.started_at, on=saga.created_at),
            moment(e.finished_at, on=saga.created_at),
            took(e.started_at, e.finished_at),
        )
        for n, e in enumerate(steps, start=1)
    ]
    # Lead with two spaces: the flexible column is the step name, not the last one.
    body = table(header, rows, width=width - 2, flexible=1, right=(0, 4, 5, 8))
    lines.append("  " + body[0])
    for line, execution in zip(body[1:], steps):
        lines.append("  " + line)
        lines += _step_details(saga, execution, width=width)
    lines.append("  att: tries that reached an outcome; del: messages that started one (more: a delivery was lost)")
    return [clip(line, width) if n else line for n, line in enumerate(lines)]


def _step_details(saga: SagaInstance, execution: StepExecution, *, width: int) -> list[str]:
    indent = "     "  # under the step's name
    lines = []
    if execution.result is not None:
        lines += _wrapped(f"{indent}result: ", _json_line(execution.result), width=width, max_lines=3)
    if execution.last_error:
        lines += _wrapped(f"{indent}error:  ", execution.last_error, width=width, max_lines=4)
    if execution.outcome_uncertain:
        lines.append(f"{indent}outcome uncertain: its effect outside the database may have happened")
    return lines


def picture_lines(saga: SagaInstance, steps: Sequence[StepExecution], *, now: datetime, width: int) -> list[str]:
    """A bar per step and compensation that started, on one time axis from the saga's creation to
    its end (or now): where the time went, at a glance."""
    started = [e for e in steps if e.started_at]
    if not started:
        return []
    origin = saga.created_at
    end = saga.finished_at or max([now, *(e.finished_at or e.started_at for e in started)])
    total = max((end - origin).total_seconds(), 0.001)
    label_width = min(24, max(len(e.name) for e in started)) + 6
    axis = max(10, width - label_width - 4)

    def column(at: datetime) -> int:
        return min(axis - 1, max(0, int((at - origin).total_seconds() / total * (axis - 1))))

    lines = [f"picture ({span(timedelta(seconds=total))} from creation to {'finish' if saga.finished_at else 'now'})"]
    for e in started:
        finish = e.finished_at or (now if e.state in (StepState.RUNNING, StepState.RETRYING) else e.started_at)
        first, last = column(e.started_at), column(finish)
        bar = " " * first + BARS.get(e.state, ".") * (last - first + 1)
        label = f"{clip(e.name, label_width - 6)} {DIRECTIONS.get(e.direction, e.direction)}"
        lines.append(f"  {label:<{label_width}}|{bar:<{axis}}|")
    scale = f"0{span(timedelta(seconds=total)):>{axis}}"
    lines.append(f"  {'':<{label_width}}{scale}")
    lines.append(f"  {LEGEND}")
    return lines


def _wrapped(prefix: str, text: str, *, width: int, max_lines: int = 6) -> list[str]:
    """`text` wrapped under `prefix` (continuation lines indented as far), at most `max_lines`."""
    lines = textwrap.wrap(
        " ".join(text.split()), width=width, initial_indent=prefix, subsequent_indent=" " * len(prefix), break_on_hyphens=False
    )
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], clip(lines[max_lines - 1] + " " + ELLIPSIS, width)]
    return lines


def _json_line(value) -> str:
    return json.dumps(value, cls=DjangoJSONEncoder, separators=(", ", ": "), sort_keys=True)
