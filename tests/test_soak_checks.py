"""The invariant checks the chaos soak (perf/chaos.py) relies on: each must see what it is for.
The soak itself runs in CI as `make chaos-short`, not here."""

import random
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from inventory.models import Stock
from orders.models import OrderStatus
from orders.selectors import money_violations, order_saga_mismatches
from payments.gateway import SimulatedProvider
from payments.selectors import provider_ledger_violations, provider_net_by_reference
from payments.services import payment_charge
from perf.chaos import FULL, SHORT, fault_schedule
from sagas.models import OutboxEvent
from sagas.outbox import outbox_emit
from sagas.selectors import outbox_repeated_events, outbox_unpublished
from tests.orders_helpers import a_product, an_order

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def provider():
    provider = SimulatedProvider(settings.PAYMENTS_PROVIDER_PATH)
    provider.reset()
    return provider


def charge(key: str, reference: str, amount: str = "20.00"):
    return payment_charge(idempotency_key=key, reference=reference, amount=Decimal(amount), currency="EUR", method="pm_ok", now=timezone.now())


@pytest.mark.parametrize("plan", [SHORT, FULL], ids=["short", "full"])
@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_every_fault_kind_strikes_inside_the_window_and_a_killed_worker_is_restarted(plan, broker):
    schedule = fault_schedule(plan, broker=broker, rng=random.Random(1))

    kinds = [f.kind for f in schedule]
    expected = {"child_kill", "worker_kill", "worker_restart", "redis_restart", "postgres_restart", "beat2_start", "beat2_stop",
                "poison", "forged", "deploy_v2", "worker_freeze", "operator", "postgres_freeze", "redis_freeze"}
    assert expected <= set(kinds)
    assert ("broker_connections_close" in kinds) == (broker == "rabbitmq")
    assert kinds.index("worker_kill") < kinds.index("worker_restart") < kinds.index("deploy_v2")
    assert kinds.index("beat2_start") < kinds.index("beat2_stop")
    assert kinds.count("poison") == kinds.count("forged") == kinds.count("operator") == 2
    assert all(0 < f.at < 1.2 * plan.window for f in schedule)


@pytest.mark.parametrize("plan", [SHORT, FULL], ids=["short", "full"])
def test_the_frozen_worker_is_frozen_longer_than_a_lock_timeout_and_nothing_else_cuts_its_locks_loose(plan):
    at = {f.kind: f.at for f in fault_schedule(plan, broker="redis", rng=random.Random(1)) if f.kind != "child_kill"}
    thaw = at["worker_freeze"] + 6 + plan.worker_freeze  # caught holding locks within 6 s, then frozen this long

    assert plan.worker_freeze > settings.SAGAS_STEP_LOCK_TIMEOUT_MAX
    assert at["deploy_v2"] + 20 < at["worker_freeze"]  # the deploy's restarts (about 10 s) are over
    for other in ("postgres_restart", "postgres_freeze"):  # these would cut the frozen session loose
        assert not at["worker_freeze"] <= at[other] <= thaw, other


def test_a_charge_the_provider_made_without_our_payment_row_is_a_violation(provider):
    provider.charge(key="saga-1:process_payment", amount=Decimal("20.00"), currency="EUR", method="pm_ok")

    violations = provider_ledger_violations()

    assert len(violations) == 1 and "we have no payment" in violations[0]


def test_a_charge_recorded_on_both_sides_is_not_a_violation_and_counts_for_its_order():
    with transaction.atomic():
        charge("saga-1:process_payment", "order-1")

    assert provider_ledger_violations() == []
    assert provider_net_by_reference() == {"order-1": Decimal("20.00")}


def test_one_order_charged_under_two_keys_is_a_double_charge():
    with transaction.atomic():
        charge("saga-1:process_payment", "order-1")
        charge("order-1:payment", "order-1")

    assert provider_ledger_violations() == ["order-1 was charged 2 times"]


def test_a_cancelled_order_that_kept_its_money_is_a_money_violation():
    a_product(price="10.00")
    order = an_order(lines=(("SKU-1", 2),))
    with transaction.atomic():
        charge("saga-x:process_payment", str(order.id))
    order.status = OrderStatus.CANCELLED
    order.save()

    violations = money_violations()  # (SQLite sums to 20, PostgreSQL to 20.00)
    assert len(violations) == 1 and violations[0].startswith(f"order {order.id} is cancelled with 20")
    assert money_violations(net_charged={}) == []


def test_a_pending_order_and_an_order_whose_saga_disagrees_are_mismatches():
    a_product()
    pending, confirmed = an_order(key="a"), an_order(key="b")
    confirmed.status = OrderStatus.CONFIRMED  # its saga is still PENDING: no worker runs here
    confirmed.save()

    mismatches = order_saga_mismatches(type(pending).objects.all())

    assert len(mismatches) == 2
    assert any("still pending" in m for m in mismatches) and any("confirmed but its saga is PENDING" in m for m in mismatches)


def test_an_event_emitted_twice_for_one_order_is_reported_once_per_type():
    for _ in range(2):
        with transaction.atomic():
            outbox_emit(aggregate_type="order", aggregate_id="o-1", event_type="ORDER_CONFIRMED", payload={})
    with transaction.atomic():
        outbox_emit(aggregate_type="order", aggregate_id="o-1", event_type="ORDER_CREATED", payload={})

    repeated = outbox_repeated_events(aggregate_type="order", event_types=["ORDER_CONFIRMED", "ORDER_CREATED"])

    assert repeated == [("o-1", "ORDER_CONFIRMED", 2)]
    assert outbox_unpublished().count() == 3
    OutboxEvent.objects.update(published_at=timezone.now() - timedelta(seconds=1))
    assert outbox_unpublished().count() == 0


def test_units_that_left_stock_without_a_committed_reservation_break_the_stock_ledger():
    from inventory.selectors import stock_ledger_violations

    product = a_product(on_hand=100)
    Stock.objects.filter(product=product).update(on_hand=95)

    assert stock_ledger_violations(initial_on_hand={product.sku: 100}) == [
        f"{product.sku}: 95 on hand + 0 committed != 100 at the start"
    ]
    assert stock_ledger_violations(initial_on_hand={product.sku: 95}) == []


@pytest.mark.services(reason="reads a Redis stream")
def test_the_stream_check_sees_an_event_published_long_before_the_redis_restart_missing_from_its_stream():
    import uuid

    from perf.chaos_checks import _stream_check
    from sagas.publishers import RedisStreamPublisher
    from sagas.relay import outbox_relay

    aggregate_type = f"crate{uuid.uuid4().hex[:8]}"
    with transaction.atomic():
        events = [outbox_emit(aggregate_type=aggregate_type, aggregate_id="a", event_type=f"E{n}", payload={}) for n in range(3)]
    publisher = RedisStreamPublisher(settings.REDIS_URL)
    outbox_relay(publisher=publisher)
    OutboxEvent.objects.filter(pk=events[0].pk).update(published_at=timezone.now() - timedelta(days=1))
    [(first_entry, _), *_] = publisher.client.xrange(f"events.{aggregate_type}")
    publisher.client.xdel(f"events.{aggregate_type}", first_entry)  # lost, long after it was published

    check = _stream_check()
    publisher.client.delete(f"events.{aggregate_type}")

    assert check.checked == 3
    assert check.violations == [f"event {events[0].id} is missing from its stream"]


# --- the checks of issue 9's faults ------------------------------------------------------------------


def test_a_poison_message_never_recorded_or_recorded_again_and_again_is_a_violation():
    from perf.chaos_checks import poison_check, poison_recorded_again
    from sagas.rejects import message_reject_record

    message_reject_record(reason="not JSON", body="not json run1-p10-notjson", queue="q")
    for _ in range(2):  # delivered again after its pool child was killed: at least once is fine
        message_reject_record(reason="not JSON", body="not json run1-p10-list", queue="q")
    for _ in range(4):  # requeued in a loop
        message_reject_record(reason="no such task", body="run1-p10-unknown", queue="q")

    check = poison_check(["run1-p10-notjson", "run1-p10-list", "run1-p10-unknown", "run1-p10-b64"])

    assert check.checked == 4
    assert check.violations == ["poison message run1-p10-unknown recorded 4 times", "poison message run1-p10-b64 recorded 0 times"]
    assert poison_recorded_again(["run1-p10-notjson", "run1-p10-list"]) == 1


def test_a_later_step_completed_before_an_earlier_one_is_a_log_order_violation():
    from perf.chaos_checks import log_order_check
    from sagas.models import SagaInstance, StepExecution, StepState

    a_product()
    in_order, forged = an_order(key="a"), an_order(key="b")
    now = timezone.now()
    StepExecution.objects.filter(saga=in_order.saga, name="create_order").update(state=StepState.COMPLETED, finished_at=now)
    StepExecution.objects.filter(saga=forged.saga, name="notify_fulfillment").update(state=StepState.COMPLETED, finished_at=now)

    check = log_order_check(SagaInstance.objects.all())

    assert check.checked == 2
    assert check.violations == [f"saga {forged.saga_id}: notify_fulfillment COMPLETED while the earlier create_order is PENDING"]


def test_steps_completed_out_of_their_order_or_a_compensation_of_a_step_never_done_are_log_order_violations():
    from perf.chaos_checks import log_order_check
    from sagas.models import SagaInstance, StepExecution, StepState

    a_product()
    order = an_order()
    now = timezone.now()
    steps = StepExecution.objects.filter(saga=order.saga)
    steps.filter(name="create_order").update(state=StepState.COMPLETED, finished_at=now)
    steps.filter(name="reserve_inventory").update(state=StepState.COMPLETED, finished_at=now - timedelta(seconds=1))
    StepExecution.objects.create(saga=order.saga, name="process_payment", position=2, direction="compensate",
                                 state=StepState.COMPLETED, finished_at=now)  # a refund of a charge never made

    check = log_order_check(SagaInstance.objects.all())

    assert check.violations == [
        f"saga {order.saga_id}: reserve_inventory completed before the earlier create_order",
        f"saga {order.saga_id}: compensation of process_payment is COMPLETED but process_payment never took effect",
    ]


def test_a_saga_whose_definition_changed_or_is_not_registered_is_a_versions_violation():
    from orders.sagas import place_order
    from perf.chaos_checks import versions_check
    from sagas.models import SagaInstance

    a_product()
    same, changed, unknown = an_order(key="a"), an_order(key="b"), an_order(key="c")
    SagaInstance.objects.filter(pk=changed.saga_id).update(definition_fingerprint="0" * 64)
    SagaInstance.objects.filter(pk=unknown.saga_id).update(version=99)

    check = versions_check(SagaInstance.objects.all())

    assert check.checked == 3
    assert check.violations == [
        f"1 saga(s) of place_order v1 started on definition 000000000000, registered is {place_order.fingerprint[:12]}",
        "1 saga(s) of place_order v99: no such definition is registered",
    ]
    assert SagaInstance.objects.get(pk=same.saga_id).definition_fingerprint == place_order.fingerprint


def test_an_aborted_saga_that_completed_anyway_is_a_violation_and_a_refused_abort_is_not_counted():
    from perf.chaos_checks import abort_check
    from sagas.models import SagaInstance, SagaState

    a_product()
    undone, completed, refused = an_order(key="a"), an_order(key="b"), an_order(key="c")
    SagaInstance.objects.filter(pk=undone.saga_id).update(state=SagaState.COMPENSATED)
    SagaInstance.objects.filter(pk__in=[completed.saga_id, refused.saga_id]).update(state=SagaState.COMPLETED)

    check = abort_check([(str(undone.saga_id), 202), (str(completed.saga_id), 202), (str(refused.saga_id), 409)])

    assert check.checked == 2
    assert check.violations == [f"saga {completed.saga_id} was aborted (202) but ended COMPLETED"]


def test_a_thawed_worker_that_ran_no_task_again_did_not_come_back():
    from perf.chaos_checks import thaw_check

    came_back = "[INFO] Task sagas.run_step[1f] succeeded in 0.03s: None"

    check = thaw_check([{"worker": "worker 0", "log_after": came_back}, {"worker": "worker 1", "log_after": "worker: Warm shutdown"}])

    assert check.violations == ["worker 1 ran no task after SIGCONT"]


def test_a_fault_class_that_never_happened_is_a_violation():
    from perf.chaos_checks import exercised_check

    check = exercised_check({"poison messages sent": 48, "forged step messages sent": 0})

    assert (check.checked, check.violations) == (2, ["forged step messages sent: none"])


def test_the_sagas_a_worker_log_shows_are_found_by_name_and_version(tmp_path):
    from perf.chaos_checks import sagas_in_logs

    log = tmp_path / "worker.log"
    log.write_text(
        "INFO sagas saga_transition saga=s1 name=place_order v=1 step=create_order direction=forward from=PENDING to=RUNNING\n"
        "INFO sagas saga_transition saga=s2 name=place_order v=2 step=create_order direction=forward from=PENDING to=RUNNING\n"
        "INFO sagas saga_transition saga=s1 name=place_order v=1 step=create_order direction=forward from=RUNNING to=COMPLETED\n"
        "INFO sagas saga_transition saga=s3 name=place_order_x v=1 step=a direction=forward from=PENDING to=RUNNING\n"
    )

    assert sagas_in_logs([log], name="place_order", version=1) == {"s1"}


def test_a_5xx_a_bare_503_a_slow_answer_no_answer_and_an_outage_without_calls_are_web_violations():
    from perf.chaos_web import Answer, web_violations

    answers = [
        Answer(at=1.0, took=0.1, method="GET", path="/api/orders/", status=200, json=True),
        Answer(at=2.0, took=4.0, method="GET", path="/api/orders/", status=503, json=True, retry_after=True),  # as it must be
        Answer(at=3.0, took=0.2, method="POST", path="/api/orders/", status=500, detail="Server Error"),
        Answer(at=4.0, took=0.2, method="GET", path="/api/health/", status=503, json=True),
        Answer(at=5.0, took=0.2, method="GET", path="/api/health/", status=503, retry_after=True),
        Answer(at=6.0, took=6.5, method="GET", path="/api/orders/", status=200, json=True),
        Answer(at=7.0, took=15.0, method="GET", path="/api/orders/", status=None, detail="TimeoutError: timed out"),
    ]

    violations = web_violations(answers, [("postgres_freeze", 2.5, 3.5), ("redis_freeze", 30.0, 34.0)])

    assert violations == [
        "POST /api/orders/ at 3.0 s: 500 Server Error",
        "GET /api/health/ at 4.0 s: 503 without Retry-After",
        "GET /api/health/ at 5.0 s: 503 without a JSON body",
        "GET /api/orders/ at 6.0 s: answered 200 after 6.5 s (more than 5 s)",
        "GET /api/orders/ at 7.0 s: no answer after 15.0 s (TimeoutError: timed out)",
        "no request was in flight during redis_freeze (30.0-34.0 s)",
    ]


def test_the_local_ports_of_a_processs_connections_to_a_server_are_found(tmp_path):
    import os
    import socket

    from perf.chaos_faults import tcp_client_ports

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            ports = tcp_client_ports(os.getpid(), server.getsockname()[1])

            assert ports == [client.getsockname()[1]]


@pytest.mark.services(reason="counts the rows PostgreSQL reads (EXPLAIN ANALYZE)")
def test_a_runs_own_invariant_check_reads_its_orders_payments_and_the_held_stock_not_the_history():
    from django.db import connection

    from inventory.services import stock_commit, stock_reserve
    from orders.selectors import shop_invariant_violations
    from orders.models import Order
    from tests.scan_helpers import rows_read

    product = a_product(price="10.00", on_hand=10_000)
    with transaction.atomic():
        for n in range(150):  # the history: other orders' payments and settled reservations
            charge(f"old-{n}:payment", f"old-{n}")
            saga_id = uuid.uuid4()
            stock_reserve(saga_id=saga_id, order_id=saga_id, quantities={product.pk: 1}, now=timezone.now())
            stock_commit(saga_id=saga_id, now=timezone.now())
    order = an_order(lines=(("SKU-1", 2),))
    with transaction.atomic():
        charge(f"{order.saga_id}:process_payment", str(order.id))
    Order.objects.filter(pk=order.pk).update(status=OrderStatus.CONFIRMED)
    this_run = Order.objects.filter(pk=order.pk)

    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")  # a few hundred rows: what counts is that an index can serve it
    try:
        assert shop_invariant_violations(this_run) == []
        payments = rows_read(lambda: shop_invariant_violations(this_run), "payments_payment")
        reservations = rows_read(lambda: shop_invariant_violations(this_run), "inventory_reservation")
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET enable_seqscan")

    assert payments <= 2, f"read {payments} payments to check one order"
    assert reservations == 0, f"read {reservations} settled reservations to add up what is held"
