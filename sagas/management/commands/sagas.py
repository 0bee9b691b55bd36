"""Operator commands over the saga log.

    python manage.py sagas versions                       # per name and version: registered? in flight?
    python manage.py sagas versions --adopt NAME VERSION  # accept a changed definition for sagas in flight
"""

from django.core.management.base import BaseCommand, CommandError

from sagas.exceptions import UnknownSagaDefinition
from sagas.services import saga_definition_adopt
from sagas.versions import describe_states, versions_in_use


class Command(BaseCommand):
    help = "Operate the saga engine: `versions` lists the definitions and the sagas in flight on each."

    def add_arguments(self, parser):
        commands = parser.add_subparsers(dest="command", required=True)
        versions = commands.add_parser("versions", help="registered saga versions and the sagas in flight on each")
        versions.add_argument(
            "--adopt",
            nargs=2,
            metavar=("NAME", "VERSION"),
            help="record the registered definition of NAME vVERSION for its sagas in flight (after an in-place "
            "change you know they can finish under)",
        )

    def handle(self, *args, command, **options):
        if command == "versions":
            if options["adopt"]:
                self._adopt(*options["adopt"])
            self._versions()

    def _versions(self) -> None:
        rows = [("saga", "version", "registered", "in flight", "FAILED", "states", "status")]
        for v in versions_in_use():
            rows.append(
                (
                    v.name,
                    str(v.version),
                    f"yes ({v.definition.fingerprint[:12]})" if v.definition else "NO",
                    str(v.in_flight),
                    str(v.failed),
                    describe_states(v.states()) or "-",
                    _status(v),
                )
            )
        widths = [max(len(row[n]) for row in rows) for n in range(len(rows[0]))]
        for row in rows:
            self.stdout.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())

    def _adopt(self, name: str, version: str) -> None:
        try:
            count = saga_definition_adopt(name=name, version=int(version))
        except (ValueError, UnknownSagaDefinition) as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(f"{count} saga(s) of {name} v{version} now carry the registered definition's fingerprint")


def _status(version) -> str:
    if version.definition is None:
        return "STRANDED: register it again" if version.in_flight else ("retry impossible" if version.failed else "")
    changed = version.changed_in_flight()
    if changed:
        return f"CHANGED for {changed} in flight: bump the version"
    return "ok" if version.in_flight or version.failed else "ok (none in flight)"
