"""Fixtures for the engine's unit tests: no worker, no broker. Messages the engine would send are
recorded instead (see `sent`)."""

import uuid
from dataclasses import dataclass, field

import pytest

from sagas import dispatch


@pytest.fixture
def unique_name(request):
    """A saga name no other test registers (the definition registry is process-wide)."""
    return f"unit_{request.node.name[:60]}_{uuid.uuid4().hex[:8]}"


@dataclass
class SentMessages:
    forward: list[tuple[str, str, int]] = field(default_factory=list)
    compensations: list[tuple[str, list[str], str]] = field(default_factory=list)
    redriven: list[str] = field(default_factory=list)  # saga ids of the sends marked as the sweeper's re-drives

    def send_forward(self, saga_id, definition, *, from_position, redrive=False):
        self.forward.append((str(saga_id), definition.name, from_position))
        if redrive:
            self.redriven.append(str(saga_id))

    def send_compensations(self, saga_id, definition, step_names, *, direction, redrive=False):
        self.compensations.append((str(saga_id), list(step_names), direction))
        if redrive:
            self.redriven.append(str(saga_id))

    def clear(self) -> None:
        self.forward.clear()
        self.compensations.clear()
        self.redriven.clear()


@pytest.fixture
def sent(monkeypatch):
    """Replace dispatch.send_forward / send_compensations with recorders."""
    recorder = SentMessages()
    monkeypatch.setattr(dispatch, "send_forward", recorder.send_forward)
    monkeypatch.setattr(dispatch, "send_compensations", recorder.send_compensations)
    return recorder
