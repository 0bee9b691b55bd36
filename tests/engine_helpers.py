"""Shared helpers for the engine's end-to-end tests."""

from django.conf import settings

from sagas.models import Direction, StepExecution, StepState
from tests.sagaapp.models import Effect


def effects(saga_id) -> list[tuple[str, str]]:
    return list(Effect.objects.filter(saga_id=saga_id).order_by("id").values_list("step", "direction"))


def effect_count(saga_id, step: str, direction: str = Direction.FORWARD) -> int:
    return Effect.objects.filter(saga_id=saga_id, step=step, direction=direction).count()


def compensations_in_start_order(saga_id) -> list[str]:
    rows = StepExecution.objects.filter(saga_id=saga_id, direction=Direction.COMPENSATE).exclude(started_at=None)
    return [e.name for e in rows.order_by("started_at")]


def step_row(saga_id, name: str, direction: str = Direction.FORWARD) -> StepExecution:
    return StepExecution.objects.get(saga_id=saga_id, name=name, direction=direction)


def wait_for_step(saga_id, name: str, state: str = StepState.RUNNING, timeout: float = 20.0) -> StepExecution:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = step_row(saga_id, name)
        if row.state == state:
            return row
        time.sleep(0.05)
    raise AssertionError(f"step {name} of saga {saga_id} never reached {state}")


def wait_for_step_in_hand(worker, saga_id, name: str, direction: str = Direction.FORWARD, timeout: float = 20.0) -> None:
    """Until `worker` runs the step's action. A first delivery shows nothing in the database
    until its one transaction commits, so this reads the worker's log: the runner logs the
    delivery inside that transaction, right before the action."""
    import re
    import time

    line = re.compile(rf"saga_transition saga={saga_id} .*step={re.escape(name)} direction={direction} from=delivered to=RUNNING")
    deadline = time.monotonic() + timeout
    while not line.search(worker.output(since_start=True)):
        if time.monotonic() > deadline:
            raise AssertionError(f"step {name} of saga {saga_id} never started:\n{worker.output(since_start=True)[-3000:]}")
        time.sleep(0.05)


def flush_broker() -> None:
    """Lose every message the broker holds, as a Redis restart without persistence would."""
    url = settings.CELERY_BROKER_URL
    if url.startswith("redis"):
        import redis

        redis.Redis.from_url(url).flushdb()
    else:
        from sqlalchemy import create_engine, text

        engine = create_engine(url.split("+", 1)[1])  # the SQLAlchemy URL behind the transport prefix
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM kombu_message"))
        engine.dispose()


def wait_for_empty_queue(timeout: float = 20.0, then: float = 1.0) -> None:
    """Until the worker has taken every message from the default queue, plus `then` seconds for
    the ones in hand to finish."""
    import time

    from config.celery import app

    deadline = time.monotonic() + timeout
    with app.connection_for_write() as conn:
        while time.monotonic() < deadline:
            try:
                _, waiting, _ = conn.default_channel.queue_declare(queue=settings.CELERY_TASK_DEFAULT_QUEUE, passive=True)
            except conn.channel_errors:
                waiting = 0  # Redis has no key for an empty queue
            if not waiting:
                break
            time.sleep(0.1)
    time.sleep(then)
