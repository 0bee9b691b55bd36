"""The compensation trigger is the queued kind of errback (DESIGN.md rule 4).

Celery decides per errback, in `Backend._call_task_errbacks`, whether to call it inline in the
failing worker as `errback(request, exc, traceback)` or to publish it as a task with the failed
task's id first. These tests drive that real Celery code with the errback dispatch attaches to
every step; only the publishing (`group.apply_async`) is recorded instead of sent."""

import uuid

import pytest
from celery.app.task import Context
from celery.canvas import group

import sagas.tasks  # noqa: F401 - registers sagas.step_failed and sagas.run_step
from config.celery import app
from sagas import dispatch, runner
from sagas.definition import COMPENSATE, FORWARD, Step

inline_calls: list[tuple[str, str]] = []


@app.task(name="sagas.tests.inline_errback")
def inline_errback(request, exc, traceback):
    """A plain errback with the (request, exc, traceback) signature: Celery calls it inline."""
    inline_calls.append((request.id, str(exc)))


def noop(ctx):
    return None


@pytest.fixture
def handled(monkeypatch):
    """Calls that reach the runner's errback handling."""
    calls: list[dict] = []
    monkeypatch.setattr(runner, "step_failure_handle", lambda **kwargs: calls.append(kwargs))
    return calls


@pytest.fixture
def published(monkeypatch):
    """(task names, args, options) of every group of errbacks Celery publishes."""
    calls: list[tuple[list, tuple, dict]] = []

    def record(self, args=None, kwargs=None, **options):
        calls.append((list(self.tasks), tuple(args or ()), options))

    monkeypatch.setattr(group, "apply_async", record)
    return calls


@pytest.fixture(autouse=True)
def _fresh_inline_calls():
    inline_calls.clear()


def failed_request(task_id: str, errbacks: list) -> Context:
    """The request of a step task that failed in a worker (not eagerly)."""
    return Context(id=task_id, root_id=task_id, errbacks=errbacks, delivery_info={"is_eager": False})


def test_the_step_failed_errback_is_published_as_a_task_with_the_failed_task_id_first(handled, published):
    saga_id = uuid.uuid4()
    step = Step("charge", action=noop)
    [errback] = dispatch.step_signature(saga_id, step, FORWARD).options["link_error"]
    assert not app.conf.task_always_eager

    app.backend._call_task_errbacks(failed_request("failed-task-1", [errback]), RuntimeError("boom"), None)

    assert handled == [], "Celery ran the compensation trigger inline in the failing worker"
    [(tasks, args, options)] = published
    assert [sig.task for sig in tasks] == ["sagas.step_failed"]
    assert args == ("failed-task-1",)
    assert options["parent_id"] == "failed-task-1"
    assert tasks[0].kwargs == {"saga_id": str(saga_id), "step": "charge", "direction": FORWARD}


def test_the_published_errback_hands_the_failed_task_id_and_the_step_to_the_runner(handled, published):
    saga_id = uuid.uuid4()
    [errback] = dispatch.step_signature(saga_id, Step("undo_charge", action=noop), COMPENSATE).options["link_error"]
    app.backend._call_task_errbacks(failed_request("failed-task-2", [errback]), RuntimeError("boom"), None)
    [(tasks, args, _)] = published

    tasks[0].clone(args=args)()  # what a worker runs for the published message

    assert handled == [
        {"saga_id": str(saga_id), "step_name": "undo_charge", "direction": COMPENSATE, "failed_task_id": "failed-task-2"}
    ]


def test_a_plain_errback_taking_request_exc_and_traceback_is_called_inline_and_not_published(handled, published):
    request = failed_request("failed-task-3", [inline_errback.s()])

    app.backend._call_task_errbacks(request, RuntimeError("boom"), None)

    assert inline_calls == [("failed-task-3", "boom")], "the contrast case: Celery calls this kind inline"
    assert published == []
    assert handled == []
