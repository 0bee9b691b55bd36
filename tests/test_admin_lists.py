"""The admin's lists of the tables that grow with the history (sagas.admin_lists): every list,
filter and search reads as many rows with twice the history as with the history; a search by id
is a key lookup; a long list shows the planner's estimate instead of counting every row; filters
take their choices without reading the table; a column is sorted only where an index serves it.
"""

import json
import uuid
from datetime import timedelta

import pytest
from django.contrib import admin
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from inventory.models import Reservation
from orders.models import Order
from payments.models import Payment, Refund
from perf.history import history_load
from perf.history_bench import HISTORY_TABLES
from sagas import admin_lists
from sagas.consumers import consume
from sagas.models import InboxMessage, OutboxEvent, SagaInstance
from sagas.outbox import outbox_emit
from sagas.publishers import message
from tests.orders_helpers import a_product, a_user, an_order

pytestmark = pytest.mark.django_db
postgres_only = pytest.mark.services(reason="the history is bulk-loaded with PostgreSQL's SQL, and plans are PostgreSQL's")

HISTORY = 300  # sagas per load: 330 orders, ~1,650 events, ~650 reservations
PAGE = 10  # rows per admin page in these tests, and rows counted exactly: far fewer than the history
HISTORY_ADMINS = [SagaInstance, Order, OutboxEvent, InboxMessage, Reservation, Payment, Refund]


def changelist(model) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


@pytest.fixture
def small_pages(monkeypatch):
    """Pages, exact counts and recent-value windows of PAGE rows: a few hundred sagas are then a
    long history, as a million are with the defaults."""
    monkeypatch.setattr(admin_lists, "EXACT_COUNT_UP_TO", PAGE)
    monkeypatch.setattr(admin_lists, "RECENT_ROWS", PAGE)
    for model in HISTORY_ADMINS:
        monkeypatch.setattr(admin.site._registry[model], "list_per_page", PAGE)


# --- flat: as many rows read at 2N as at N --------------------------------------------------------


def rows_read(node: dict) -> int:
    """Rows the plan under `node` read from history tables: what each scan returned plus what its
    filter threw away, times its loops."""
    kind, table = node.get("Node Type", ""), node.get("Relation Name", "")
    own = 0
    if kind in ("Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Heap Scan") and table in HISTORY_TABLES:
        per_loop = node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0) + node.get("Rows Removed by Index Recheck", 0)
        own = per_loop * node.get("Actual Loops", 1)
    return own + sum(rows_read(child) for child in node.get("Plans", []))


def page_reads(client, url: str) -> tuple[int, list[str]]:
    """(rows the page's statements read from history tables, the statements). A few hundred rows
    are too few for the planner to prefer an index on its own (a table of a few pages is read
    whole); with sequential scans priced out, as they are by a million rows, a statement that no
    index serves still reads every row, and so reads twice as many with twice the history."""
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200, url
    statements = [q["sql"] for q in captured.captured_queries if q["sql"].lstrip().upper().startswith("SELECT")]
    total = 0
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")
        try:
            for sql in statements:
                cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql.replace("%", "%%"))
                plan = cursor.fetchone()[0]
                total += rows_read((json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"])
        finally:
            cursor.execute("RESET enable_seqscan")
    return total, statements


def pages_of_the_history() -> dict[str, str]:
    """A URL per list, filter choice and kind of search of each history admin."""
    saga = SagaInstance.objects.filter(state="COMPLETED").order_by("created_at").first()
    order = Order.objects.filter(saga=saga).select_related("owner").get()
    event = OutboxEvent.objects.filter(aggregate_id=str(order.id)).first()
    inbox = InboxMessage.objects.order_by("id").first()
    reservation = Reservation.objects.filter(saga_id=saga.id).first()
    payment = Payment.objects.get(reference=str(order.id))
    week_ago = (timezone.now() - timedelta(days=7)).isoformat().replace("+", "%2B")
    urls = {
        "sagas": "",
        "sagas COMPLETED": "state=COMPLETED",
        "sagas FAILED": "state=FAILED",
        "sagas by name": "name=place_order",
        "sagas stuck": "stuck_for=5",
        "sagas this week": f"created_at__gte={week_ago}",
        "saga by id": f"q={saga.id}",
        "sagas by the start of an id": f"q={str(saga.id)[:8]}",
        "saga by idempotency key": f"q={saga.idempotency_key}",
        "orders": "",
        "orders pending": "status=pending",
        "orders cancelled": "status=cancelled",
        "orders choreographed": "flow=choreographed",
        "orders this week": f"created_at__gte={week_ago}",
        "order by id": f"q={order.id}",
        "order by saga id": f"q={saga.id}",
        "orders by customer": f"q={order.owner.username}",
        "events": "",
        "events waiting": "delivery=waiting",
        "events dead-lettered": "delivery=dead",
        "events published": "delivery=published",
        "events of orders": "aggregate_type=order",
        "events created": "event_type=ORDER_CREATED",
        "event by sequence": f"q={event.sequence}",
        "event by id": f"q={event.id}",
        "events of an aggregate": f"q={order.id}",
        "inbox": "",
        "inbox of a consumer": f"consumer={inbox.consumer}",
        "inbox of an event type": f"event_type={inbox.event_type}",
        "inbox by event": f"q={inbox.event_id}",
        "reservations": "",
        "reservations held": "status=reserved",
        "reservations committed": "status=committed",
        "reservations of a saga": f"q={reservation.saga_id}",
        "reservations of a product": f"q={reservation.product.sku}",
        "payments": "",
        "payments refunded": "status=refunded",
        "payments by method": "method=pm_ok",
        "payments by currency": f"currency={payment.currency}",
        "payments this week": f"created_at__gte={week_ago}",
        "payment of an order": f"q={order.id}",
        "payment by provider reference": f"q={payment.provider_reference}",
        "refunds": "",
        "refunds of an order": f"q={order.id}",
    }
    models = {"saga": SagaInstance, "order": Order, "event": OutboxEvent, "inbox": InboxMessage, "reservation": Reservation,
              "payment": Payment, "refund": Refund}
    model_of = lambda name: next(m for prefix, m in models.items() if name.startswith(prefix))  # noqa: E731
    return {name: f"{changelist(model_of(name))}?{query}" for name, query in urls.items()}


def load_history() -> None:
    """HISTORY more sagas, and the planner's statistics brought up to date (as autovacuum would)."""
    history_load(sagas=HISTORY, chunk=150, progress=False, vacuum=False)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


@postgres_only
def test_every_admin_list_filter_and_search_reads_as_many_rows_with_twice_the_history(admin_client, small_pages):
    for n in range(5):
        a_product(f"HIST-{n}", price=f"{n + 1}.50", on_hand=100_000)
    load_history()
    pages = pages_of_the_history()
    at_n = {name: page_reads(admin_client, url)[0] for name, url in pages.items()}

    load_history()
    at_2n = {name: page_reads(admin_client, url) for name, url in pages.items()}

    grew = {name: (at_n[name], rows) for name, (rows, _) in at_2n.items() if rows - at_n[name] > max(2 * PAGE, at_n[name] // 2)}
    assert grew == {}, f"rows read at {HISTORY} and {2 * HISTORY} sagas: {grew}"
    sql = [statement for _, statements in at_2n.values() for statement in statements]
    assert not [s for s in sql if " LIKE " in s.upper()], "a search that scans"
    assert not [s for s in sql if "DISTINCT" in s.upper()], "filter choices read from the table"


# --- search by id: a key lookup --------------------------------------------------------------------


@pytest.fixture
def an_order_with_its_events():
    """A pending order, its saga and its ORDER_CREATED event."""
    a_product()
    return an_order(user=a_user("alice"))


@pytest.mark.parametrize(
    ("model", "term", "expected"),
    [
        (SagaInstance, lambda order: str(order.saga_id), lambda order: {order.saga_id}),
        (SagaInstance, lambda order: str(order.saga_id).upper(), lambda order: {order.saga_id}),
        (Order, lambda order: str(order.id), lambda order: {order.id}),
        (Order, lambda order: str(order.saga_id), lambda order: {order.id}),
        (Order, lambda order: str(order.id)[:13], lambda order: {order.id}),
        (OutboxEvent, lambda order: str(OutboxEvent.objects.get(aggregate_id=str(order.id)).id),
         lambda order: {OutboxEvent.objects.get(aggregate_id=str(order.id)).pk}),
        (OutboxEvent, lambda order: str(order.id), lambda order: {OutboxEvent.objects.get(aggregate_id=str(order.id)).pk}),
    ],
)
def test_a_search_by_id_finds_its_row_by_key_and_never_with_like(admin_client, an_order_with_its_events, model, term, expected):
    order = an_order_with_its_events

    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(changelist(model), {"q": term(order)})

    assert response.status_code == 200
    assert {obj.pk for obj in response.context["cl"].result_list} == expected(order)
    assert not [q["sql"] for q in captured.captured_queries if "LIKE" in q["sql"].upper()]


def test_a_search_that_is_no_id_and_no_key_finds_nothing_without_reading_the_table(admin_client, an_order_with_its_events):
    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(changelist(SagaInstance), {"q": "no such thing"})

    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == []
    assert not [q["sql"] for q in captured.captured_queries if "LIKE" in q["sql"].upper()]


@pytest.mark.parametrize("model", [InboxMessage, OutboxEvent, Order, Payment])
def test_a_search_no_row_can_match_answers_an_empty_page(admin_client, model):
    a_product()
    with transaction.atomic():
        event = outbox_emit(aggregate_type="thing", aggregate_id=uuid.uuid4(), event_type="THING_HAPPENED", payload={})
    consume(consumer="test-recorder", message=message(event))  # an inbox row
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")  # statistics: the count asks the planner first

    response = admin_client.get(changelist(model), {"q": "not-an-id"})

    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == []


def test_uuid_q_turns_the_start_of_a_uuid_into_the_range_of_the_uuids_that_start_with_it():
    ranged = admin_lists.uuid_q("id", "3F2A9C41-7b")

    assert ranged.children == [
        ("id__gte", uuid.UUID("3f2a9c41-7b00-0000-0000-000000000000")),
        ("id__lte", uuid.UUID("3f2a9c41-7bff-ffff-ffff-ffffffffffff")),
    ]
    assert admin_lists.uuid_q("id", "alice") is None
    assert admin_lists.number_q("sequence", "42").children == [("sequence", 42)]
    assert admin_lists.number_q("sequence", "4x2") is None


# --- counts: exact when short, the planner's estimate when long ------------------------------------


@pytest.fixture
def three_pages_of_events():
    with transaction.atomic():
        for n in range(3 * PAGE):
            outbox_emit(aggregate_type="thing", aggregate_id=n, event_type="THING_HAPPENED", payload={})


def list_counts(captured) -> list[str]:
    """The statements that counted the outbox list (not the title's live figures, outbox_stats)."""
    return [q["sql"] for q in captured.captured_queries if q["sql"].startswith("SELECT COUNT(") and "published_at" not in q["sql"]]


@postgres_only
def test_a_long_list_shows_the_planners_estimate_without_counting_a_row(admin_client, small_pages, three_pages_of_events):
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sagas_outboxevent")

    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(changelist(OutboxEvent))

    paginator = response.context["cl"].paginator
    assert paginator.estimated is True
    assert 2 * PAGE <= paginator.count <= 4 * PAGE, "ANALYZE saw the rows: the estimate is about right"
    assert f"about {paginator.count} outbox events" in response.content.decode()
    assert list_counts(captured) == []


@postgres_only
def test_a_short_list_is_counted_reading_at_most_one_row_past_the_bound(admin_client, an_order_with_its_events, small_pages):
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE orders_order")  # statistics that say so (they outlive other tests' rolled back rows)

    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(changelist(Order))

    paginator = response.context["cl"].paginator
    assert (paginator.count, paginator.estimated) == (1, False)
    assert "1 order" in response.content.decode() and "about" not in response.content.decode().split('class="paginator"')[1][:200]
    counts = [q["sql"] for q in captured.captured_queries if q["sql"].startswith("SELECT COUNT(")]
    assert len(counts) == 1 and f"LIMIT {PAGE + 1}" in counts[0]


@postgres_only
def test_a_list_the_planner_thinks_short_but_is_not_counts_up_to_the_bound_and_says_more(small_pages):
    with transaction.atomic():  # type and event type always together: the planner takes them as independent
        for n in range(2 * PAGE):
            outbox_emit(aggregate_type="thing", aggregate_id=n, event_type="THING_HAPPENED", payload={})
        for n in range(6 * PAGE):
            outbox_emit(aggregate_type="other", aggregate_id=n, event_type="OTHER_HAPPENED", payload={})
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sagas_outboxevent")
    things = OutboxEvent.objects.filter(aggregate_type="thing", event_type="THING_HAPPENED")

    assert admin_lists.planned_rows(things) <= PAGE < things.count()
    assert admin_lists.list_count(things) == (PAGE + 1, True)


@pytest.mark.skipif(connection.vendor == "postgresql", reason="SQLite's count (embedded mode)")
def test_on_sqlite_a_long_list_is_counted_exactly(admin_client, small_pages, three_pages_of_events):
    response = admin_client.get(changelist(OutboxEvent))

    paginator = response.context["cl"].paginator
    assert (paginator.count, paginator.estimated) == (3 * PAGE, False)
    assert f"{3 * PAGE} outbox events" in response.content.decode()


# --- filters and sorting ----------------------------------------------------------------------------


def test_the_saga_name_filter_offers_the_registered_definitions_without_reading_the_table(admin_client, an_order_with_its_events):
    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(changelist(SagaInstance))

    name_filter = next(spec for spec in response.context["cl"].filter_specs if getattr(spec, "parameter_name", None) == "name")
    assert "place_order" in [value for value, _ in name_filter.lookup_choices]
    assert not [q["sql"] for q in captured.captured_queries if "DISTINCT" in q["sql"].upper()]


def test_the_outbox_filters_offer_what_the_events_hold(admin_client, an_order_with_its_events):
    response = admin_client.get(changelist(OutboxEvent))

    choices = {spec.parameter_name: [v for v, _ in spec.lookup_choices] for spec in response.context["cl"].filter_specs
               if getattr(spec, "parameter_name", None) in ("aggregate_type", "event_type")}
    assert choices == {"aggregate_type": ["order"], "event_type": ["ORDER_CREATED"]}
    filtered = admin_client.get(changelist(OutboxEvent), {"event_type": "ORDER_CREATED"})
    assert [e.event_type for e in filtered.context["cl"].result_list] == ["ORDER_CREATED"]


def test_a_column_no_index_serves_is_not_sorted_even_when_the_url_asks(admin_client, an_order_with_its_events):
    state_column = admin_client.get(changelist(SagaInstance)).context["cl"].list_display.index("coloured_state")

    with CaptureQueriesContext(connection) as captured:
        response = admin_client.get(changelist(SagaInstance), {"o": str(state_column)})

    assert response.status_code == 200
    page = next(q["sql"] for q in captured.captured_queries if q["sql"].startswith('SELECT "sagas_sagainstance"."id", "sagas_sagainstance"."name"'))
    assert 'ORDER BY "sagas_sagainstance"."created_at" DESC, "sagas_sagainstance"."id" DESC' in page
    assert '"state"' not in page.split("ORDER BY")[1]
