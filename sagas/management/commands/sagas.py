"""Operator commands over the saga log: see and steer sagas from a shell.

    python manage.py sagas list [--state S | --failed] [--name N] [--stuck] [--limit K] [--before ID]
    python manage.py sagas show ID                        # the saga, its timeline and a picture of it
    python manage.py sagas retry ID --user NAME           # a FAILED saga's compensations, with a fresh budget
    python manage.py sagas abort ID --user NAME [--reason TEXT]
    python manage.py sagas redrive ID --user NAME         # send what comes next again (messages lost)
    python manage.py sagas versions                       # per name and version: registered? in flight?
    python manage.py sagas versions --adopt NAME VERSION  # accept a changed definition for sagas in flight

Every subcommand takes --json. Reads go through sagas.selectors and actions through
sagas.services, as in the staff API and the admin; an action names its operator (--user, or
CHAINSAGA_OPERATOR), who needs the same permissions as there (sagas.permissions). A refused
request (unknown saga, wrong state, missing permission) is one line on stderr and exit status 1.
"""

import json
import os
import shutil
import uuid

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.core.serializers.json import DjangoJSONEncoder
from django.utils import timezone

from sagas import cli
from sagas.exceptions import SagaNotFound, SagaStateConflict, UnknownSagaDefinition
from sagas.models import SagaInstance, SagaState
from sagas.permissions import ABORT_SAGA, REDRIVE_SAGA, RETRY_SAGA, VIEW_SAGA, staff_holds
from sagas.selectors import saga_last_errors, saga_timeline, sagas_newest_first
from sagas.services import saga_abort, saga_definition_adopt, saga_redrive, saga_retry_compensation
from sagas.versions import describe_states, versions_in_use

DEFAULT_LIMIT = 50
MAX_LIMIT = 1000
OPERATOR_ENV = "CHAINSAGA_OPERATOR"


class Command(BaseCommand):
    help = "See and steer sagas: list, show, retry, abort, redrive, versions (each with --json)."
    # The operator's tool runs when the deployment is wrong too: the sagas system check (a version
    # in flight not registered) must not stop `sagas versions` from showing what it complains about.
    requires_system_checks = []

    def add_arguments(self, parser):
        commands = parser.add_subparsers(dest="command", required=True, metavar="{list,show,retry,abort,redrive,versions}")

        listing = commands.add_parser("list", help="a page of sagas, newest first")
        which = listing.add_mutually_exclusive_group()
        which.add_argument("--state", choices=SagaState.values, help="only sagas in this state")
        which.add_argument("--failed", action="store_true", help="only FAILED sagas (a compensation needs attention)")
        listing.add_argument("--name", help="only sagas of this definition name")
        listing.add_argument("--stuck", action="store_true", help="only unfinished sagas past their stuck_after (the sweeper re-drives them)")
        listing.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help=f"at most this many (default {DEFAULT_LIMIT}, at most {MAX_LIMIT})")
        listing.add_argument("--before", metavar="ID", help="the next page: sagas older than this one (the last id shown)")

        show = commands.add_parser("show", help="one saga: its timeline to the millisecond, results, errors")
        show.add_argument("id", metavar="ID")

        for name, help_text in (
            ("retry", "give a FAILED saga's failed compensations a fresh retry budget and run them again"),
            ("abort", "stop a running saga: it compensates what it completed"),
            ("redrive", "send again what the saga log says comes next (its messages were lost)"),
        ):
            action = commands.add_parser(name, help=help_text)
            action.add_argument("id", metavar="ID")
            action.add_argument("--user", help=f"the operator acting (default: ${OPERATOR_ENV}); needs the permissions the API asks for")
            if name == "abort":
                action.add_argument("--reason", default="", help="recorded with the operator's name as the saga's failure reason")

        versions = commands.add_parser("versions", help="registered saga versions and the sagas in flight on each")
        versions.add_argument(
            "--adopt",
            nargs=2,
            metavar=("NAME", "VERSION"),
            help="record the registered definition of NAME vVERSION for its sagas in flight (after an in-place "
            "change you know they can finish under)",
        )

        for sub in commands.choices.values():
            sub.add_argument("--json", dest="as_json", action="store_true", help="machine-readable output")
            sub.add_argument("--width", type=int, default=shutil.get_terminal_size((100, 24)).columns, help="line width (default: the terminal's, else 100)")

    def handle(self, *args, command, as_json: bool, width: int, **options):
        self.as_json, self.width = as_json, max(width, 60)
        if command == "list":
            self._list(**options)
        elif command == "show":
            self._show(options["id"])
        elif command == "versions":
            if options["adopt"]:
                self._adopt(*options["adopt"])
            self._versions()
        else:
            self._operate(command, options["id"], user=options["user"], reason=options.get("reason", ""))

    # --- reading ------------------------------------------------------------------------------------

    def _list(self, *, state, failed, name, stuck, limit, before, **options) -> None:
        if not 1 <= limit <= MAX_LIMIT:
            raise CommandError(f"--limit must be between 1 and {MAX_LIMIT}")
        now = timezone.now()
        states = [SagaState.FAILED] if failed else [state] if state else None
        older_than = _saga(before) if before else None
        sagas = sagas_newest_first(states=states, name=name, stuck_at=now if stuck else None, before=older_than, limit=limit)
        last_errors = saga_last_errors(s.id for s in sagas if not s.failure_reason)
        if self.as_json:
            return self._json([cli.saga_summary(s, last_errors.get(s.id)) for s in sagas])
        if not sagas:
            return self.stdout.write("no sagas match")
        self._lines(cli.saga_list_lines(sagas, last_errors, now=now, width=self.width))
        if len(sagas) == limit:
            self.stdout.write(f"{limit} shown, newest first; older ones: the same command with --before {sagas[-1].id}")

    def _show(self, saga_id: str) -> None:
        saga = _saga(saga_id)
        steps = saga_timeline(saga)
        now = timezone.now()
        if self.as_json:
            return self._json(cli.saga_detail(saga, steps, now=now))
        self._lines(cli.saga_lines(saga, steps, now=now, width=self.width))

    def _versions(self) -> None:
        versions = versions_in_use()
        if self.as_json:
            return self._json([_version_data(v) for v in versions])
        rows = [
            (
                v.name,
                str(v.version),
                f"yes ({v.definition.fingerprint[:12]})" if v.definition else "NO",
                str(v.in_flight),
                str(v.failed),
                describe_states(v.states()) or "-",
                _status(v),
            )
            for v in versions
        ]
        header = ("saga", "version", "registered", "in flight", "FAILED", "states", "status")
        self._lines(cli.table(header, rows, width=10_000, flexible=5))  # never cut: names and counts must read whole

    # --- acting ---------------------------------------------------------------------------------------

    def _operate(self, command: str, saga_id: str, *, user: str | None, reason: str) -> None:
        saga_id = _saga_id(saga_id)
        permission = {"retry": RETRY_SAGA, "abort": ABORT_SAGA, "redrive": REDRIVE_SAGA}[command]
        operator = _operator(user, command, permission)
        before = _saga(saga_id).state
        try:
            if command == "retry":
                saga = saga_retry_compensation(saga_id=saga_id)
                done = "compensation retried"
            elif command == "abort":
                why = f"aborted by {operator} from the command line" + (f": {reason}" if reason else "")
                saga = saga_abort(saga_id=saga_id, reason=why)
                done = "aborted" if before != SagaState.COMPENSATING else "was COMPENSATING already: left unchanged"
            else:
                saga = saga_redrive(saga_id=saga_id, by=f"{operator} from the command line")
                done = f"re-driven (re-drive {saga.redrives})"
        except SagaNotFound:
            raise CommandError(f"no saga {saga_id}") from None
        except (SagaStateConflict, UnknownSagaDefinition) as exc:
            raise CommandError(str(exc)) from None
        if self.as_json:
            return self._json(cli.saga_summary(saga))
        self.stdout.write(f"saga {saga.id}: {done}, now {saga.state}")

    def _adopt(self, name: str, version: str) -> None:
        try:
            count = saga_definition_adopt(name=name, version=int(version))
        except (ValueError, UnknownSagaDefinition) as exc:
            raise CommandError(str(exc)) from None
        if not self.as_json:
            self.stdout.write(f"{count} saga(s) of {name} v{version} now carry the registered definition's fingerprint")

    # --- output ----------------------------------------------------------------------------------------

    def _lines(self, lines) -> None:
        for line in lines:
            self.stdout.write(line)

    def _json(self, data) -> None:
        self.stdout.write(json.dumps(data, cls=DjangoJSONEncoder, indent=2))


def _saga_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise CommandError(f"{text!r} is not a saga id: give the UUID that `sagas list` shows") from None


def _saga(text) -> SagaInstance:
    saga_id = text if isinstance(text, uuid.UUID) else _saga_id(text)
    try:
        return SagaInstance.objects.get(pk=saga_id)
    except SagaInstance.DoesNotExist:
        raise CommandError(f"no saga {saga_id}") from None


def _operator(username: str | None, command: str, permission: str) -> str:
    """The operator's username, once they are an active staff user holding the permissions the staff
    API asks for this action; CommandError otherwise."""
    username = username or os.environ.get(OPERATOR_ENV, "")
    needed = (VIEW_SAGA, permission)
    if not username:
        raise CommandError(f"say who acts: --user USERNAME (or {OPERATOR_ENV}), a staff user with {', '.join(needed)}")
    try:
        user = get_user_model().objects.get_by_natural_key(username)
    except get_user_model().DoesNotExist:
        raise CommandError(f"no user {username!r}") from None
    if not staff_holds(user, needed):
        verb = {"redrive": "re-drive"}.get(command, command)
        raise CommandError(f"{username} may not {verb} sagas: an active staff user with {', '.join(needed)} may")
    return username


def _version_data(version) -> dict:
    return {
        "name": version.name,
        "version": version.version,
        "registered": version.definition is not None,
        "fingerprint": version.definition.fingerprint if version.definition else None,
        "in_flight": version.in_flight,
        "failed": version.failed,
        "states": version.states(),
        "changed_in_flight": version.changed_in_flight(),
        "status": _status(version),
    }


def _status(version) -> str:
    if version.definition is None:
        return "STRANDED: register it again" if version.in_flight else ("retry impossible" if version.failed else "")
    changed = version.changed_in_flight()
    if changed:
        return f"CHANGED for {changed} in flight: bump the version"
    return "ok" if version.in_flight or version.failed else "ok (none in flight)"

