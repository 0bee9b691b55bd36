"""Saga definitions: retry policy arithmetic, what a definition refuses, and the registry."""

import random
from datetime import timedelta

import pytest

from sagas.definition import Retry, Saga, Step, get_definition
from sagas.exceptions import BusinessError, InvalidSagaDefinition, TransientError, UnknownSagaDefinition


def noop(ctx):
    return None


class Declined(Exception):
    pass


class HardDeclined(Declined):
    pass


class OutOfStock(BusinessError):
    pass


# --- Retry.delay ---------------------------------------------------------------------------------


def test_the_retry_delay_doubles_with_every_failed_try():
    policy = Retry(initial_delay=0.5, max_delay=1000.0, jitter=False)

    delays = [policy.delay(attempt) for attempt in range(1, 7)]

    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]


def test_the_retry_delay_is_capped_at_max_delay():
    policy = Retry(initial_delay=1.0, max_delay=5.0, jitter=False)

    delays = [policy.delay(attempt) for attempt in range(1, 12)]

    assert delays[:3] == [1.0, 2.0, 4.0]
    assert delays[3:] == [5.0] * 8
    assert policy.delay(60) == 5.0, "a huge attempt number must not overflow past the cap"


def test_without_jitter_the_delay_equals_its_ceiling_whatever_the_random_source():
    policy = Retry(initial_delay=2.0, max_delay=60.0, jitter=False)

    delays = {policy.delay(4, rng=random.Random(seed)) for seed in range(20)}

    assert delays == {16.0}


@pytest.mark.parametrize(("attempt", "ceiling"), [(1, 1.0), (3, 4.0), (5, 10.0), (9, 10.0)])
def test_with_jitter_the_delay_stays_between_half_the_ceiling_and_the_ceiling(attempt, ceiling):
    policy = Retry(initial_delay=1.0, max_delay=10.0, jitter=True)
    rng = random.Random(1234)

    delays = [policy.delay(attempt, rng=rng) for _ in range(2000)]

    assert all(ceiling / 2 <= d <= ceiling for d in delays), (min(delays), max(delays))
    assert min(delays) < ceiling * 0.55 and max(delays) > ceiling * 0.95, "the jitter spans the whole range"


def test_jitter_uses_the_random_source_it_is_given():
    policy = Retry(initial_delay=1.0, max_delay=10.0, jitter=True)

    first = [policy.delay(4, rng=random.Random(7)) for _ in range(3)]
    again = [policy.delay(4, rng=random.Random(7)) for _ in range(3)]
    other = policy.delay(4, rng=random.Random(8))

    assert first == again
    assert other != first[0]


# --- Retry.is_retryable --------------------------------------------------------------------------


@pytest.mark.parametrize("error", [OutOfStock("no stock"), BusinessError("declined")])
def test_a_business_error_is_never_retryable(error):
    policy = Retry(max_attempts=10)

    retryable = policy.is_retryable(error)

    assert retryable is False


@pytest.mark.parametrize("error", [Declined("card declined"), HardDeclined("stolen card")])
def test_a_type_listed_as_non_retryable_and_its_subclasses_are_not_retryable(error):
    policy = Retry(non_retryable=(Declined,))

    retryable = policy.is_retryable(error)

    assert retryable is False


@pytest.mark.parametrize("error", [TransientError("timeout"), ValueError("odd"), ConnectionResetError(), Declined("x")])
def test_any_other_error_is_retryable(error):
    policy = Retry(non_retryable=(KeyError,))

    retryable = policy.is_retryable(error)

    assert retryable is True


# --- what a Saga refuses -------------------------------------------------------------------------


def test_a_saga_without_steps_is_refused(unique_name):
    with pytest.raises(InvalidSagaDefinition, match="no steps"):
        Saga(unique_name, version=1, steps=[])

    with pytest.raises(UnknownSagaDefinition):
        get_definition(unique_name, 1)


def test_a_saga_that_repeats_a_step_name_is_refused(unique_name):
    steps = [Step("reserve", action=noop), Step("charge", action=noop), Step("reserve", action=noop)]

    with pytest.raises(InvalidSagaDefinition, match="more than one step named"):
        Saga(unique_name, version=1, steps=steps)

    with pytest.raises(UnknownSagaDefinition):
        get_definition(unique_name, 1)


def test_a_step_whose_timeout_plus_retry_delay_reaches_the_visibility_timeout_is_refused(settings, unique_name):
    settings.SAGAS_VISIBILITY_TIMEOUT = 20
    fast_undo = Retry(max_delay=1.0)
    step = Step("charge", action=noop, timeout=10.0, retry=Retry(max_delay=10.0), compensation_retry=fast_undo)

    with pytest.raises(InvalidSagaDefinition, match="visibility timeout"):
        Saga(unique_name, version=1, steps=[step])


def test_the_compensation_retry_delay_counts_against_the_visibility_timeout_too(settings, unique_name):
    settings.SAGAS_VISIBILITY_TIMEOUT = 20
    step = Step("charge", action=noop, timeout=5.0, retry=Retry(max_delay=1.0), compensation_retry=Retry(max_delay=15.0))

    with pytest.raises(InvalidSagaDefinition, match="visibility timeout"):
        Saga(unique_name, version=1, steps=[step])


def test_a_step_well_below_the_visibility_timeout_is_accepted(settings, unique_name):
    settings.SAGAS_VISIBILITY_TIMEOUT = 20
    step = Step("charge", action=noop, timeout=2.0, retry=Retry(max_delay=10.0), compensation_retry=Retry(max_delay=1.0))

    saga = Saga(unique_name, version=1, steps=[step])

    assert get_definition(unique_name, 1) is saga


def test_registering_a_name_and_version_again_with_other_steps_is_refused(unique_name):
    first = Saga(unique_name, version=1, steps=[Step("reserve", action=noop), Step("charge", action=noop)])

    with pytest.raises(InvalidSagaDefinition, match="bump the version"):
        Saga(unique_name, version=1, steps=[Step("reserve", action=noop), Step("ship", action=noop)])

    assert get_definition(unique_name, 1) is first, "the refused definition did not replace the first"


def test_registering_the_same_steps_again_is_allowed_and_a_new_version_may_differ(unique_name):
    Saga(unique_name, version=1, steps=[Step("reserve", action=noop)])

    again = Saga(unique_name, version=1, steps=[Step("reserve", action=noop)])
    v2 = Saga(unique_name, version=2, steps=[Step("reserve", action=noop), Step("charge", action=noop)])

    assert get_definition(unique_name, 1) is again
    assert get_definition(unique_name, 2) is v2


def test_get_definition_of_an_unregistered_saga_raises_unknown_saga_definition(unique_name):
    Saga(unique_name, version=1, steps=[Step("reserve", action=noop)])

    with pytest.raises(UnknownSagaDefinition, match=f"{unique_name} v2"):
        get_definition(unique_name, 2)
    with pytest.raises(UnknownSagaDefinition):
        get_definition(f"{unique_name}_other", 1)


def test_the_hard_time_limit_grace_counts_against_the_visibility_timeout(settings, unique_name):
    settings.SAGAS_VISIBILITY_TIMEOUT = 20
    step = Step("charge", action=noop, timeout=9.0, retry=Retry(max_delay=10.0), compensation_retry=Retry(max_delay=1.0))

    with pytest.raises(InvalidSagaDefinition, match="visibility timeout"):
        Saga(unique_name, version=1, steps=[step])


# --- fingerprints -----------------------------------------------------------------------------


def undo(ctx):
    return None


def other_undo(ctx):
    return None


def two_steps(name: str, *, swap: bool = False, step_b: dict | None = None, **options) -> Saga:
    steps = [Step("a", action=noop, compensation=undo), Step(**{"name": "b", "action": noop, "compensation": undo, **(step_b or {})})]
    return Saga(name, version=1, steps=steps[::-1] if swap else steps, **options)


def test_two_definitions_of_the_same_steps_and_policies_have_the_same_fingerprint(unique_name):
    # Names and values only (no ids or addresses): a worker and the web process agree.
    first, second = two_steps(f"{unique_name}_1"), two_steps(f"{unique_name}_2")

    assert first.fingerprint == second.fingerprint
    assert len(first.fingerprint) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"swap": True},
        {"step_b": {"compensation": other_undo}},
        {"step_b": {"compensation": None}},
        {"step_b": {"action": undo}},
        {"step_b": {"retry": Retry(max_attempts=5)}},
        {"step_b": {"retry": Retry(non_retryable=(KeyError,))}},
        {"step_b": {"compensation_retry": Retry(max_delay=1.0)}},
        {"step_b": {"timeout": 12.0}},
        {"step_b": {"max_deliveries": 5}},
        {"step_b": {"compensate_uncertain": True}},
        {"step_b": {"on_failure": undo}},
        {"compensate_in_parallel": True},
        {"continue_on_compensation_failure": True},
        {"deadline": timedelta(minutes=5)},
        {"on_finish": undo},
    ],
    ids=lambda change: ",".join(f"{k}={v}" for k, v in change.items())[:40],
)
def test_a_change_to_steps_order_actions_compensations_hooks_or_policies_changes_the_fingerprint(unique_name, change):
    before = two_steps(f"{unique_name}_before")

    after = two_steps(f"{unique_name}_after", **change)

    assert before.fingerprint != after.fingerprint
