import pytest

from sagas.models import Direction, SagaState
from sagas.testing import timeline, wait_for_saga
from tests.sagaapp.models import Effect
from tests.sagaapp.sagas import STEP_NAMES, four_steps


@pytest.mark.django_db(transaction=True)
def test_a_saga_whose_steps_all_succeed_completes_with_each_effect_once(saga_worker):
    saga = four_steps.start(input={})

    saga = wait_for_saga(saga.id)

    assert saga.state == SagaState.COMPLETED, timeline(saga.id)
    effects = list(Effect.objects.filter(saga_id=saga.id).values_list("step", "direction"))
    assert effects == [(name, Direction.FORWARD) for name in STEP_NAMES]
