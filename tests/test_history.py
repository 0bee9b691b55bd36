"""The benchmark's bulk-loaded history (perf.history) looks like what the services leave behind;
the engine's hot paths reach the rows they need through an index however long the history; and
the benchmark reports both (perf.history_bench)."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.core import checks
from django.db import connection, transaction
from django.db.models import Count
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from config import health
from orders.models import Flow, IdempotencyRecord, Order, OrderStatus
from orders.selectors import money_violations, order_reservation_violations, order_saga_mismatches, stock_violations
from orders.services import LineRequest, order_place
from perf.history import history_load
from perf.history_bench import explain, plan_cell
from perf.history_bench import markdown as history_markdown
from sagas import consumers, relay
from sagas.models import InboxMessage, OutboxEvent, SagaInstance, SagaState, StepExecution
from sagas.outbox import outbox_emit
from sagas.selectors import consumer_inbox_gaps, outbox_stats, saga_step_order_violations, sagas_unfinished
from sagas.services import saga_sweep
from sagas.versions import saga_definition_mismatches
from tests.orders_helpers import a_product, a_user
from tests.test_saga_versions import versions_table

pytestmark = pytest.mark.django_db
postgres_only = pytest.mark.services(reason="the history is bulk-loaded with PostgreSQL's SQL")

SAGAS = 600  # 660 orders: every kind of saga, one FAILED (order 500), choreographed ones too


@pytest.fixture
def products():
    return [a_product(f"HIST-{n}", price=f"{n + 1}.50", on_hand=100_000) for n in range(5)]


@pytest.fixture
def history(products):
    return history_load(sagas=SAGAS, chunk=250, progress=False, vacuum=False)


def history_orders(loaded):
    return Order.objects.filter(owner__username__startswith=f"hist-{loaded.salt}-")


@postgres_only
def test_the_history_has_the_sagas_asked_for_in_every_finished_state(history):
    sagas = SagaInstance.objects.filter(order__in=history_orders(history))
    states = dict(sagas.values_list("state").annotate(n=Count("pk")))

    assert sagas.count() == SAGAS
    assert history_orders(history).count() == SAGAS + SAGAS // 10
    assert history_orders(history).filter(flow=Flow.CHOREOGRAPHED, saga__isnull=True).count() == SAGAS // 10
    assert states[SagaState.FAILED] == 1
    assert states[SagaState.COMPENSATED] > 30
    assert states[SagaState.COMPLETED] == SAGAS - states[SagaState.FAILED] - states[SagaState.COMPENSATED]
    assert set(sagas.values_list("name", "version").distinct()) == {("place_order", 1)}
    assert StepExecution.objects.filter(saga__in=sagas, direction="forward").count() == 4 * SAGAS
    assert not StepExecution.objects.filter(saga__in=sagas.filter(state=SagaState.COMPLETED), direction="compensate").exists()


@postgres_only
def test_the_history_keeps_the_shops_and_the_engines_invariants(history):
    orders = history_orders(history)
    sagas = SagaInstance.objects.filter(order__in=orders)
    failed_orders = {str(o) for o in orders.filter(saga__state=SagaState.FAILED).values_list("pk", flat=True)}

    mismatches = order_saga_mismatches(orders)

    # A FAILED saga (its refund kept failing) leaves its order pending for an operator, as in life.
    assert len(mismatches) == len(failed_orders) == 1
    assert next(iter(failed_orders)) in mismatches[0]
    assert money_violations(orders) == []
    assert order_reservation_violations(orders) == []
    assert stock_violations() == []
    assert saga_step_order_violations(sagas) == []
    assert sagas_unfinished(sagas).count() == 0
    assert consumer_inbox_gaps() == []
    assert InboxMessage.objects.count() == 3 * (SAGAS // 10)
    assert not OutboxEvent.objects.filter(published_at__isnull=True).exists()


@postgres_only
def test_the_system_check_and_the_versions_command_accept_the_history(history):
    table = versions_table()

    assert saga_definition_mismatches() == []
    assert [m for m in checks.run_checks(tags=["sagas"]) if m.is_serious()] == []
    assert "place_order" in table and "STRANDED" not in table and "CHANGED" not in table


@postgres_only
def test_the_sweeper_the_relay_and_the_redelivery_sweep_leave_the_history_alone(history):
    later = timezone.now() + timedelta(days=30)  # past every step timeout and deadline

    assert saga_sweep(now=later) == {"overdue": 0, "redriven": 0}
    assert list(relay.claimable(later)) == []
    assert consumers.consumers_redeliver(now=timezone.now(), min_age=timedelta(0), window=timedelta(days=30)) == 0
    assert relay.outbox_cleanup(now=timezone.now()).deleted == 0  # inside the retention


@postgres_only
def test_a_loaded_order_is_what_the_order_service_would_have_written(history):
    loaded = history_orders(history).filter(flow=Flow.ORCHESTRATED, status=OrderStatus.CONFIRMED).first()
    lines = [LineRequest(item.sku, item.quantity) for item in loaded.items.order_by("id")]

    placed = order_place(owner=a_user("shopper"), lines=lines, payment_method=loaded.payment_method, idempotency_key="same-body").order

    def created(order):
        payload = OutboxEvent.objects.get(aggregate_id=str(order.pk), event_type="ORDER_CREATED").payload
        return {k: v for k, v in payload.items() if k not in ("order_id", "owner_id")}

    assert created(loaded) == created(placed)
    assert placed.total == loaded.total > Decimal("0")
    assert IdempotencyRecord.objects.get(order=placed).fingerprint == IdempotencyRecord.objects.get(order=loaded).fingerprint
    assert loaded.saga.definition_fingerprint == placed.saga.definition_fingerprint
    assert list(loaded.saga.steps.filter(direction="forward").order_by("position").values_list("name", "state")) == [
        ("create_order", "COMPLETED"), ("reserve_inventory", "COMPLETED"), ("process_payment", "COMPLETED"),
        ("notify_fulfillment", "COMPLETED"),
    ]


@postgres_only
def test_indexes_set_aside_for_a_big_load_are_all_built_again(products):
    before = index_names()

    history_load(sagas=50, progress=False, vacuum=False, set_aside_indexes=True)

    assert index_names() == before
    assert "outbox_published_idx" in before and "step_unique_per_direction" in before


def index_names() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")
        return {name for (name,) in cursor.fetchall()}


# --- the hot paths' plans -------------------------------------------------------------------------
# A few hundred sagas are too few for the planner to prefer an index on its own; with sequential
# scans priced out, a query whose index is missing still shows a "Seq Scan" (or a walk of the whole
# primary key): what these tests catch is an index that was dropped or a query that cannot use it.


def hot_path_plans(fn) -> list[list[str]]:
    """How each statement `fn` sends to sagas_outboxevent or sagas_sagainstance reads its table."""
    with CaptureQueriesContext(connection) as captured:
        fn()
    statements = [q["sql"] for q in captured.captured_queries if "sagas_outboxevent" in q["sql"] or "FROM \"sagas_sagainstance\"" in q["sql"]]
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")
    try:
        return [explain(sql)["scans"] for sql in statements if sql.lstrip().upper().startswith(("SELECT", "DELETE", "UPDATE"))]
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET enable_seqscan")


@postgres_only
@pytest.mark.parametrize(
    ("path", "fn", "index"),
    [
        ("consumers redelivery sweep", lambda: consumers.consumers_redeliver(
            now=timezone.now(), min_age=timedelta(seconds=60), window=timedelta(hours=24)), "outbox_unconsumed_idx"),
        ("outbox cleanup", lambda: relay.outbox_cleanup(), "outbox_published_idx"),
        ("health's outbox rate", lambda: outbox_stats(now=timezone.now()), "outbox_published_idx"),
        ("health's outbox backlog", lambda: outbox_stats(now=timezone.now()), "outbox_unpublished_idx"),
        ("relay claim", lambda: list(relay.claimable(timezone.now())[:500]), "outbox_unpublished_idx"),
        ("sweeper", lambda: saga_sweep(now=timezone.now()), "saga_"),
        ("health's database facts", lambda: health.database_facts(now=timezone.now()), "saga_stuck_idx"),
    ],
)
def test_a_hot_path_reads_the_history_through_its_index(history, path, fn, index):
    plans = hot_path_plans(fn)

    assert plans, f"{path} sent no statement to the saga log or the outbox"
    assert not [p for p in plans if any(s.startswith("Seq Scan sagas_") for s in p)], f"{path}: {plans}"
    assert any(any(s.endswith(index) or f" {index}" in s for s in p) for p in plans), f"{path}: {plans}"


# --- health's outbox figures, read through those indexes ---------------------------------------------


def test_outbox_stats_count_the_backlog_the_dead_letter_and_the_last_minutes_rate():
    now = timezone.now()
    with transaction.atomic():
        _waiting, parked, just_published, published_before = (
            outbox_emit(aggregate_type="order", aggregate_id=n, event_type="TICK", payload={}, now=now - timedelta(seconds=30 - n))
            for n in range(4)
        )
    OutboxEvent.objects.filter(pk=parked.pk).update(dead_lettered_at=now)
    OutboxEvent.objects.filter(pk=just_published.pk).update(published_at=now - timedelta(seconds=10))
    OutboxEvent.objects.filter(pk=published_before.pk).update(published_at=now - timedelta(minutes=2))

    stats = outbox_stats(now=now)

    assert stats == {"backlog": 1, "oldest_unpublished_age_s": 30.0, "published_per_s": round(1 / 60, 2), "dead_lettered": 1}


def test_the_history_indexes_exist_on_either_database():
    with connection.cursor() as cursor:
        outbox = connection.introspection.get_constraints(cursor, OutboxEvent._meta.db_table)
        sagas = connection.introspection.get_constraints(cursor, SagaInstance._meta.db_table)

    assert outbox["outbox_published_idx"]["columns"] == ["published_at", "event_type"]
    assert sagas["saga_created_idx"]["columns"] == ["created_at", "id"]
    assert sagas["saga_created_idx"]["orders"] == ["DESC", "DESC"]


# --- the report's section -------------------------------------------------------------------------


def test_the_report_shows_each_query_at_0_and_at_n_and_marks_a_sequential_scan_of_the_history():
    seq = {"sql": 'SELECT "a" FROM "sagas_outboxevent"', "ms": 700.0, "scans": ["Seq Scan sagas_outboxevent"]}
    indexed = {"sql": 'SELECT "a" FROM "sagas_sagainstance" WHERE "state" = \'FAILED\'', "ms": 0.1, "scans": ["Index Only Scan saga_stuck_idx"]}
    point = lambda ms, plans: {"ms": ms, "runs": [ms], "_plans": plans, "plan": plan_cell(plans)}  # noqa: E731
    history = {
        "sagas": 1_000_000, "repeat": 5, "web_deadline_s": 4.0,
        "load": {"seconds": 300.0, "rows_seconds": 200.0, "indexes_seconds": 60.0, "vacuum_seconds": 40.0, "orders": 1_100_000,
                 "since": "2026-11-19T19:00:00", "until": "2026-11-25T19:00:00"},
        "throughput_at_0": {"sagas": 300, "per_s": 20.0, "p50_ms": 900.0, "p99_ms": 1500.0},
        "throughput_at_n": {"sagas": 300, "per_s": 19.0, "p50_ms": 950.0, "p99_ms": 1600.0},
        "at_0": {"health: database facts": point(9.0, [seq]), "admin: saga list": point(40.0, [indexed])},
        "at_n": {"health: database facts": point(700.0, [seq]), "admin: saga list": point(4500.0, [indexed])},
        "tables": {"sagas_outboxevent": {"rows": 5_500_000, "mib": 3000.0}},
    }

    text = "\n".join(history_markdown(history))

    assert "| health: database facts | 9.0 | 700.0 | **Seq Scan sagas_outboxevent** |" in text
    assert "| admin: saga list | 40.0 | 4500.0 (over the 4 s request deadline: a 503 in production) | Index Only Scan saga_stuck_idx |" in text
    assert "**20.0 sagas/s at 0, 19.0 sagas/s at 1,000,000**" in text
    assert "- health: database facts: `SELECT ... FROM sagas_outboxevent`: Seq Scan sagas_outboxevent, 700.0 ms" in text
    assert "- admin: saga list" not in text  # statement by statement: only the engine's
