"""System checks: a deploy that would strand or silently change sagas in flight refuses to start,
and so does one whose retention would forget an inbox row while its event can still come again.

Registered under the tag "sagas". Django runs it for `migrate` and `runserver` (and `check`);
sagas.apps runs it when a celery worker or beat starts. It reads the saga log, so it is skipped
when the database cannot be read yet (no tables before the first `migrate`, database down): then
there is nothing this process could run either.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.core import checks
from django.db import DatabaseError

from sagas.versions import VersionInUse, describe_states, versions_in_use

log = logging.getLogger("sagas")

TAG = "sagas"
RECIPE = "see the README, 'Upgrading a saga'"


@checks.register(TAG)
def check_definitions_in_flight(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    try:
        versions = versions_in_use()
    except DatabaseError as exc:
        log.debug("sagas version check skipped: the saga log cannot be read (%s)", type(exc).__name__)
        return []
    return [message for version in versions for message in _messages(version)]


@checks.register(TAG)
def check_inbox_retention(app_configs=None, **kwargs) -> list[checks.CheckMessage]:
    """An inbox row pruned while its event is still retained could let a repeat of the event (a
    stream repaired from the outbox, the redelivery sweep) run its handler a second time."""
    days = settings.SAGAS_INBOX_RETENTION_DAYS
    outlast = max(timedelta(hours=settings.OUTBOX_RETENTION_HOURS), timedelta(hours=settings.CONSUMER_REDELIVER_WINDOW_HOURS))
    if not days or timedelta(days=days) > outlast:
        return []
    return [
        checks.Error(
            f"SAGAS_INBOX_RETENTION_DAYS={days:g} does not outlast OUTBOX_RETENTION_HOURS={settings.OUTBOX_RETENTION_HOURS} "
            f"and CONSUMER_REDELIVER_WINDOW_HOURS={settings.CONSUMER_REDELIVER_WINDOW_HOURS}: an event delivered again "
            "after its inbox row was pruned would be handled twice",
            hint=f"set SAGAS_INBOX_RETENTION_DAYS above {outlast / timedelta(days=1):g} (or 0 to keep inbox rows forever)",
            id="sagas.E003",
        )
    ]


def _messages(version: VersionInUse) -> list[checks.CheckMessage]:
    label = f"{version.name} v{version.version}"
    if version.definition is None and version.in_flight:
        return [
            checks.Error(
                f"{version.in_flight} saga(s) of {label} are in flight ({describe_states(version.states())}) "
                f"but this deployment does not register {label}: they would be stranded",
                hint=f"keep {label} registered beside the new version until `manage.py sagas versions` shows none "
                f"in flight; {RECIPE}",
                id="sagas.E001",
            )
        ]
    if version.definition is None and version.failed:
        return [
            checks.Warning(
                f"{version.failed} FAILED saga(s) of {label} need an operator, and this deployment does not "
                f"register {label}: their compensation cannot be retried",
                hint=f"register {label} again to retry them; {RECIPE}",
                id="sagas.W001",
            )
        ]
    changed = version.changed_in_flight()
    if changed:
        return [
            checks.Error(
                f"{changed} saga(s) of {label} in flight started on another definition of {label} than "
                "the one registered now (its steps, order, compensations or policies changed without a "
                "version bump): they would go on under the new one",
                hint=f"restore {label} as it was and register the change as version {version.version + 1}; "
                f"{RECIPE}. If the sagas in flight can finish under the change, "
                f"`manage.py sagas versions --adopt {version.name} {version.version}` records it.",
                id="sagas.E002",
            )
        ]
    return []


def refuse_to_start_on_errors(process: str) -> None:
    """Run the check as `process` starts (celery worker or beat) and exit with the errors, as
    `runserver` and `migrate` do."""
    errors = [m for m in checks.run_checks(tags=[TAG]) if m.is_serious()]
    if errors:
        report = "\n".join(str(e) for e in errors)
        log.critical("%s refuses to start:\n%s", process, report)
        raise SystemExit(f"{process} refuses to start: the sagas system checks failed\n{report}")
