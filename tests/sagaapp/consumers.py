"""A test consumer: records one Effect per handled event, so duplicates would be countable."""

import os
import uuid

from sagas import BusinessError
from sagas.consumers import ConsumedEvent, subscribe
from tests.sagaapp.models import Effect


def settle_thing(event: ConsumedEvent, reason: str) -> None:
    """The test consumer's settlement when it gives up: an Effect row a test can count."""
    Effect.objects.create(saga_id=uuid.UUID(event.aggregate_id), step="GIVEN_UP", direction="event", pid=os.getpid())


@subscribe("test-recorder", events=["THING_HAPPENED"], on_give_up=settle_thing)
def record_thing(event: ConsumedEvent) -> None:
    if event.payload.get("fail"):
        raise ValueError("the handler failed")
    if event.payload.get("refuse"):
        raise BusinessError("the thing cannot be done")
    if event.payload.get("crash"):
        os.kill(os.getpid(), 9)  # the worker process dies mid-handler
    Effect.objects.create(saga_id=uuid.UUID(event.aggregate_id), step=event.type, direction="event", pid=os.getpid())


@subscribe("test-filtered", events=["THING_HAPPENED"], where={"colour": "red"})
def record_red_thing(event: ConsumedEvent) -> None:
    Effect.objects.create(saga_id=uuid.UUID(event.aggregate_id), step="red", direction="event", pid=os.getpid())
