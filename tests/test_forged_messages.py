"""Messages the saga log did not ask for, on a real worker: the log decides what may run (rule 13)."""

import pytest
from celery import signature

from inventory.models import Reservation, Stock
from orders.sagas import place_order
from orders.models import OrderStatus
from payments.models import Payment
from sagas import dispatch
from sagas.models import SagaState, StepState
from sagas.testing import timeline, wait_for_saga
from tests.orders_helpers import a_product, an_order, assert_shop_invariants

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_forged_last_step_for_an_order_whose_first_step_never_ran_is_dropped(saga_worker, monkeypatch):
    product = a_product(on_hand=10)
    with monkeypatch.context() as lost:
        lost.setattr(dispatch, "send_forward", lambda *args, **kwargs: None)  # the first step's message never left
        order = an_order(lines=[(product.sku, 2)])

    signature("sagas.run_step", kwargs={"saga_id": str(order.saga_id), "step": "notify_fulfillment", "direction": "forward"}).apply_async()
    saga_worker.wait_for_output(f"saga_message_dropped saga={order.saga_id} step=notify_fulfillment")

    order.refresh_from_db()
    assert order.status == OrderStatus.PENDING
    assert order.saga.state == SagaState.PENDING
    assert [s.state for s in order.saga.steps.order_by("position")] == [StepState.PENDING] * 4
    assert not Reservation.objects.exists() and not Payment.objects.exists()
    assert Stock.objects.get(pk=product.pk).reserved == 0

    dispatch.send_forward(order.saga_id, place_order, from_position=0)  # as the sweeper would
    saga = wait_for_saga(order.saga_id, timeout=60)
    order.refresh_from_db()
    assert (saga.state, order.status) == (SagaState.COMPLETED, OrderStatus.CONFIRMED), timeline(saga.id)
    assert_shop_invariants()
