"""A saga's timeline as a picture: a server-rendered SVG, one bar per step and compensation that
ran, on a time axis shared from the saga's start to its end (or now), coloured by outcome, with
retries and lost deliveries written beside the bar. No JavaScript; each bar has a tooltip.

Used by the saga's admin page; `saga_timeline_svg` takes what the page has read already.
"""

from __future__ import annotations

from datetime import datetime

from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from sagas.models import SagaInstance, StepExecution, StepState

LABEL_WIDTH, PLOT_WIDTH, NOTE_WIDTH = 190, 600, 150
ROW_HEIGHT, BAR_HEIGHT, AXIS_HEIGHT = 24, 14, 28
GREEN, RED, AMBER, GREY, BLUE = "#2e7d32", "#c62828", "#ef8f00", "#9e9e9e", "#1565c0"
FORWARD_COLOURS = {StepState.COMPLETED: GREEN, StepState.FAILED: RED, StepState.RUNNING: AMBER, StepState.RETRYING: AMBER}
COMPENSATION_COLOURS = {StepState.COMPLETED: BLUE, StepState.FAILED: RED, StepState.RUNNING: AMBER, StepState.RETRYING: AMBER}
LEGEND = (("done", GREEN), ("undone (compensation)", BLUE), ("running / retrying", AMBER), ("failed", RED))


def bar_colour(execution: StepExecution) -> str:
    colours = FORWARD_COLOURS if execution.direction == "forward" else COMPENSATION_COLOURS
    return colours.get(execution.state, GREY)


def lost_deliveries(execution: StepExecution) -> int:
    """Deliveries that never reached an outcome (a worker lost, a hard time limit); one still in
    progress is not lost."""
    in_progress = 1 if execution.state == StepState.RUNNING else 0
    return max(0, execution.deliveries - execution.attempts - in_progress)


def duration_ms(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds() * 1000


def saga_timeline_svg(saga: SagaInstance, executions: list[StepExecution], *, now: datetime | None = None) -> SafeString:
    """The picture for `executions` (the saga's timeline, in start order); those that never
    started have no bar."""
    now = now or timezone.now()
    ran = [e for e in executions if e.started_at is not None]
    start = saga.created_at
    end = max([saga.finished_at or now, *(e.finished_at or now for e in ran)])
    span = max((end - start).total_seconds(), 0.001)

    def x(moment: datetime) -> float:
        return LABEL_WIDTH + PLOT_WIDTH * max(0.0, (moment - start).total_seconds()) / span

    rows = []
    for index, execution in enumerate(ran):
        top = AXIS_HEIGHT + index * ROW_HEIGHT
        left = x(execution.started_at)
        right = x(execution.finished_at or now)
        took = duration_ms(execution.started_at, execution.finished_at)
        notes = []
        if execution.attempts > 1:
            notes.append(f"{execution.attempts} attempts")
        lost = lost_deliveries(execution)
        if lost:
            notes.append(f"{lost} lost deliver{'y' if lost == 1 else 'ies'}")
        arrow = "\u2190 " if execution.direction != "forward" else ""
        tooltip = (
            f"{execution.direction} {execution.name}: {execution.state}, "
            f"{'%.1f ms' % took if took is not None else 'still running'}, "
            f"attempts {execution.attempts}, deliveries {execution.deliveries}"
            + (f"; {execution.last_error[:300]}" if execution.last_error else "")
        )
        rows.append(
            (
                top + BAR_HEIGHT - 2, f"{arrow}{execution.name}",
                execution.name, execution.direction, execution.state.lower(),
                f"{left:.1f}", top + (ROW_HEIGHT - BAR_HEIGHT) // 2, f"{max(right - left, 2.0):.1f}", BAR_HEIGHT, bar_colour(execution),
                tooltip,
                f"{LABEL_WIDTH + PLOT_WIDTH + 6}", top + BAR_HEIGHT - 2, RED if lost else "#333", ", ".join(notes),
            )
        )
    height = AXIS_HEIGHT + max(len(ran), 1) * ROW_HEIGHT + 24
    width = LABEL_WIDTH + PLOT_WIDTH + NOTE_WIDTH
    ticks = format_html_join(
        "",
        '<line x1="{0}" y1="{1}" x2="{0}" y2="{2}" stroke="#ddd"/><text x="{0}" y="14" text-anchor="middle">{3}</text>',
        ((f"{LABEL_WIDTH + PLOT_WIDTH * q:.1f}", AXIS_HEIGHT - 6, height - 24, _tick_label(span * q)) for q in (0, 0.25, 0.5, 0.75, 1)),
    )
    bars = format_html_join(
        "",
        '<text x="4" y="{}">{}</text>'
        '<rect class="timeline-bar" data-step="{}" data-direction="{}" data-state="{}" x="{}" y="{}" width="{}" height="{}" rx="2" fill="{}">'
        "<title>{}</title></rect>"
        '<text x="{}" y="{}" fill="{}">{}</text>',
        rows,
    )
    legend = format_html_join(
        "",
        '<rect x="{}" y="{}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{}</text>',
        ((LABEL_WIDTH + i * 150, height - 14, colour, LABEL_WIDTH + i * 150 + 14, height - 5, label) for i, (label, colour) in enumerate(LEGEND)),
    )
    empty = format_html('<text x="{}" y="{}" fill="#757575">no step has started yet</text>', LABEL_WIDTH, AXIS_HEIGHT + 16) if not ran else ""
    return format_html(
        '<svg class="saga-timeline" xmlns="http://www.w3.org/2000/svg" role="img" width="100%" style="max-width:{}px" '
        'viewBox="0 0 {} {}" preserveAspectRatio="xMinYMin meet" font-family="sans-serif" font-size="12" '
        'aria-label="Timeline of saga {}: {} step and compensation bars">{}{}{}{}</svg>',
        width, width, height, saga.id, len(ran), ticks, bars, empty, legend,
    )


def _tick_label(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"
