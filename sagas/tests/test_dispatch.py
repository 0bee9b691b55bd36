"""Turning saga-log decisions into Celery messages: a chain built from `link`, every message with
the queued `sagas.step_failed` errback. Nothing is published: Signature.apply_async is recorded."""

import uuid

import pytest
from celery.canvas import Signature

from sagas import dispatch
from sagas.definition import COMPENSATE, FORWARD, Retry, Saga, Step


def noop(ctx):
    return None


@pytest.fixture
def published(monkeypatch):
    """The signatures `apply_async` was called on, in order."""
    calls: list[Signature] = []

    def record(self, args=None, kwargs=None, **options):
        calls.append(self)

    monkeypatch.setattr(Signature, "apply_async", record)
    return calls


@pytest.fixture
def four_steps(unique_name):
    return Saga(
        unique_name,
        version=1,
        steps=[
            Step("reserve", action=noop, compensation=noop, timeout=3.0),
            Step("charge", action=noop, compensation=noop, timeout=7.5, retry=Retry(max_delay=5.0)),
            Step("ship", action=noop, compensation=noop, timeout=11.0, queue="shipping"),
            Step("notify", action=noop, timeout=2.0),
        ],
    )


def unlink(head: Signature) -> list[Signature]:
    """The chain that `link` options spell out, head first; fails on a fork."""
    chain = [head]
    while head.options.get("link"):
        assert len(head.options["link"]) == 1, f"{head['kwargs']['step']} links to more than one task"
        head = head.options["link"][0]
        chain.append(head)
    return chain


def test_send_forward_publishes_one_message_whose_links_chain_every_later_step(published, four_steps):
    saga_id = uuid.uuid4()

    dispatch.send_forward(saga_id, four_steps, from_position=0)

    assert len(published) == 1
    chain = unlink(published[0])
    assert [(sig.task, sig.kwargs) for sig in chain] == [
        ("sagas.run_step", {"saga_id": str(saga_id), "step": name, "direction": FORWARD})
        for name in ["reserve", "charge", "ship", "notify"]
    ]


def test_send_forward_from_a_later_position_starts_the_chain_there(published, four_steps):
    saga_id = uuid.uuid4()

    dispatch.send_forward(saga_id, four_steps, from_position=2)

    assert [sig.kwargs["step"] for sig in unlink(published[0])] == ["ship", "notify"]


def test_every_step_message_is_immutable_time_limited_and_errbacks_to_step_failed(published, four_steps):
    saga_id = uuid.uuid4()

    dispatch.send_forward(saga_id, four_steps, from_position=0)

    for sig, step in zip(unlink(published[0]), four_steps.steps, strict=True):
        assert sig.immutable, f"{step.name}: a mutable link would get the previous result as an argument"
        assert sig.options["soft_time_limit"] == step.timeout
        assert sig.options["time_limit"] == step.timeout + dispatch.HARD_LIMIT_GRACE
        [errback] = sig.options["link_error"]
        assert errback.task == "sagas.step_failed"
        assert errback.kwargs == {"saga_id": str(saga_id), "step": step.name, "direction": FORWARD}
        assert errback.args == (), "the failed task id must be the errback's only positional argument"
        assert sig.options.get("queue") == step.queue


def test_sequential_compensations_are_one_chain_in_the_order_given(published, four_steps):
    saga_id = uuid.uuid4()

    dispatch.send_compensations(saga_id, four_steps, ["ship", "charge", "reserve"], direction=COMPENSATE)

    assert len(published) == 1
    chain = unlink(published[0])
    assert [(sig.kwargs["step"], sig.kwargs["direction"]) for sig in chain] == [
        ("ship", COMPENSATE), ("charge", COMPENSATE), ("reserve", COMPENSATE)
    ]
    assert [sig.options["link_error"][0].kwargs["direction"] for sig in chain] == [COMPENSATE] * 3


def test_parallel_compensations_are_separate_unlinked_messages(published, unique_name):
    parallel = Saga(
        unique_name,
        version=1,
        steps=[Step("reserve", action=noop, compensation=noop), Step("charge", action=noop, compensation=noop)],
        compensate_in_parallel=True,
    )

    dispatch.send_compensations(uuid.uuid4(), parallel, ["charge", "reserve"], direction=COMPENSATE)

    assert [sig.kwargs["step"] for sig in published] == ["charge", "reserve"]
    assert [sig.options.get("link") for sig in published] == [None, None]


def test_linked_joins_signatures_without_changing_the_first_ones_identity():
    sigs = [dispatch.step_signature(uuid.uuid4(), Step(name, action=noop), FORWARD) for name in "abc"]

    head = dispatch.linked(sigs)

    assert head is sigs[0]
    assert sigs[0].options["link"] == [sigs[1]]
    assert sigs[1].options["link"] == [sigs[2]]
    assert "link" not in sigs[2].options
