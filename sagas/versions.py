"""Which saga definitions the sagas in flight need, and whether this deployment has them.

A saga finishes on the definition it started with (DESIGN.md rule 14). A deploy that dropped the
version some sagas in flight started with would strand them; one that changed a registered
version's steps or policies in place would silently run them on another process. Both are found
here, from the saga log and the registry, for the system check (sagas.checks: `migrate`,
`runserver`, the worker and beat refuse to start) and for `manage.py sagas versions`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from django.db.models import Count

from sagas.definition import Saga, registered
from sagas.models import ACTIVE_STATES, SagaInstance, SagaState

# Sagas in these states still need their definition: to go on, or (FAILED) for an operator retry.
NEEDS_DEFINITION = (*ACTIVE_STATES, SagaState.FAILED)


@dataclass
class VersionInUse:
    """One (name, version) as the saga log and this deployment's registry see it."""

    name: str
    version: int
    definition: Saga | None
    # fingerprint recorded at start -> {state: count}; "" for sagas started before it was recorded
    by_fingerprint: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        return sum(n for states in self.by_fingerprint.values() for state, n in states.items() if state in ACTIVE_STATES)

    @property
    def failed(self) -> int:
        return sum(states.get(SagaState.FAILED, 0) for states in self.by_fingerprint.values())

    def states(self) -> dict[str, int]:
        totals: dict[str, int] = defaultdict(int)
        for states in self.by_fingerprint.values():
            for state, n in states.items():
                totals[state] += n
        return dict(totals)

    def changed_in_flight(self) -> int:
        """Sagas in flight that started on another definition than the one registered under this version."""
        if self.definition is None:
            return 0
        return sum(
            n
            for fingerprint, states in self.by_fingerprint.items()
            if fingerprint and fingerprint != self.definition.fingerprint
            for state, n in states.items()
            if state in ACTIVE_STATES
        )


def versions_in_use() -> list[VersionInUse]:
    """Every registered version, and every version a saga that still needs its definition started
    with, sorted by name and version. One grouped query over the unfinished sagas."""
    versions = {(d.name, d.version): VersionInUse(d.name, d.version, d) for d in registered()}
    rows = (
        SagaInstance.objects.filter(state__in=NEEDS_DEFINITION)
        .values("name", "version", "definition_fingerprint", "state")
        .annotate(n=Count("pk"))
        .order_by()
    )
    for row in rows:
        key = (row["name"], row["version"])
        version = versions.setdefault(key, VersionInUse(row["name"], row["version"], None))
        version.by_fingerprint.setdefault(row["definition_fingerprint"], {})[row["state"]] = row["n"]
    return [versions[key] for key in sorted(versions)]


def describe_states(states: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(states.items()))


def saga_definition_mismatches(sagas=None) -> list[str]:
    """Sagas whose recorded definition is not the one this process registers under their name and
    version (a saga that would go on, or went on, under another process than it started with), or
    whose version is not registered at all; one line per (name, version, fingerprint)."""
    sagas = SagaInstance.objects.all() if sagas is None else sagas
    rows = sagas.values("name", "version", "definition_fingerprint").annotate(n=Count("pk")).order_by("name", "version")
    registry = {(d.name, d.version): d for d in registered()}
    mismatches = []
    for row in rows:
        label = f"{row['name']} v{row['version']}"
        definition = registry.get((row["name"], row["version"]))
        if definition is None:
            mismatches.append(f"{row['n']} saga(s) of {label}: no such definition is registered")
        elif row["definition_fingerprint"] != definition.fingerprint:
            mismatches.append(f"{row['n']} saga(s) of {label} started on definition {row['definition_fingerprint'][:12] or '(none)'}, "
                              f"registered is {definition.fingerprint[:12]}")
    return mismatches
