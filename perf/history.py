"""A long history for the benchmark: bulk-load N finished place_order sagas, shaped like the ones
the engine leaves behind, so `make bench` can show what the hot paths cost as the log grows.

    history_load(sagas=1_000_000)   # PostgreSQL only; a few minutes on 2 cores

For each orchestrated order (place_order v1, with the registered definition's fingerprint): the
SagaInstance, its four forward StepExecutions (and the compensations a compensated or failed saga
has), the order and its items, the stock reservations, the payment, the API's idempotency record,
and the published OutboxEvents the steps emitted (five for a confirmed order). One order in eleven
is choreographed instead, as the bench's own choreographed variant: no saga, but the same domain
rows and events, and an inbox row and a delivery count per event its consumers handled. So
`sagas=1_000_000` loads 1.1M orders, 1M sagas, ~5.5M events and 0.3M inbox rows.

Mix: 93.9% COMPLETED, 5% COMPENSATED after a declined card, 1% COMPENSATED out of stock (the
choreographed ones: 95% confirmed, 5% declined), and 0.1% FAILED: a refund that kept failing,
which leaves the order pending, its stock reserved and its charge unrefunded, as it would be
waiting for an operator. Orders belong to N/50 customers of their own and are spread evenly over
`span` ending `until` (by default the six days up to an hour ago): inside the outbox retention
(outbox_cleanup has nothing to delete) and past every step timeout and deadline (the sweeper has
nothing to do), with a sixth of them inside the consumers' redelivery window.

The rows are written by `INSERT ... SELECT generate_series` in chunks, entirely in the database;
ids are derived from the row number and a salt (md5), so loading twice (another salt) never
collides. This bypasses the services on purpose (a million sagas through the worker would take
hours); tests/test_history.py checks the result against the same invariants the soak checks.
"""

from __future__ import annotations

import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import DatabaseError, connection, transaction
from django.utils import timezone

CHOREOGRAPHED_EVERY = 11  # order i is choreographed when i % 11 == 10: N sagas come with N // 10 of them
CUSTOMER_ORDERS = 50  # orders per customer, on average
DECLINED = "card declined by the issuer"
DECLINED_ERROR = f"PaymentDeclined: {DECLINED} (at payments/gateway.py:115)"
REFUND_ERROR = "GatewayUnavailable: provider unavailable (call 5) (at payments/gateway.py:121)"
NOTIFY_ERROR = "OperationalError: canceling statement due to lock timeout (at orders/services.py:223)"

# The step rows of each kind of orchestrated saga:
# (kind, name, position, direction, state, attempts, deliveries, started ms, finished ms, error, result)
# "error" names what last_error/reason hold: declined, nostock, refund, notify or "" for none;
# "result" what the step returned: order, reservations, payment or "" for none.
STEPS = [
    *[("ok", *row) for row in (
        ("create_order", 0, "forward", "COMPLETED", 1, 1, 20, 35, "", "order"),
        ("reserve_inventory", 1, "forward", "COMPLETED", 1, 1, 80, 130, "", "reservations"),
        ("process_payment", 2, "forward", "COMPLETED", 1, 1, 470, 490, "", "payment"),
        ("notify_fulfillment", 3, "forward", "COMPLETED", 1, 1, 700, 735, "", ""),
    )],
    *[("declined", *row) for row in (
        ("create_order", 0, "forward", "COMPLETED", 1, 1, 20, 35, "", "order"),
        ("reserve_inventory", 1, "forward", "COMPLETED", 1, 1, 80, 130, "", "reservations"),
        ("process_payment", 2, "forward", "FAILED", 1, 1, 470, 490, "declined", ""),
        ("notify_fulfillment", 3, "forward", "PENDING", 0, 0, None, None, "", ""),
        ("reserve_inventory", 1, "compensate", "COMPLETED", 1, 1, 500, 520, "", ""),
        ("create_order", 0, "compensate", "COMPLETED", 1, 1, 540, 560, "", ""),
    )],
    *[("nostock", *row) for row in (
        ("create_order", 0, "forward", "COMPLETED", 1, 1, 20, 35, "", "order"),
        ("reserve_inventory", 1, "forward", "FAILED", 1, 1, 80, 130, "nostock", ""),
        ("process_payment", 2, "forward", "PENDING", 0, 0, None, None, "", ""),
        ("notify_fulfillment", 3, "forward", "PENDING", 0, 0, None, None, "", ""),
        ("create_order", 0, "compensate", "COMPLETED", 1, 1, 150, 170, "", ""),
    )],
    *[("failed", *row) for row in (
        ("create_order", 0, "forward", "COMPLETED", 1, 1, 20, 35, "", "order"),
        ("reserve_inventory", 1, "forward", "COMPLETED", 1, 1, 80, 130, "", "reservations"),
        ("process_payment", 2, "forward", "COMPLETED", 1, 1, 470, 490, "", "payment"),
        ("notify_fulfillment", 3, "forward", "FAILED", 3, 3, 700, 9_700, "notify", ""),
        ("process_payment", 2, "compensate", "FAILED", 5, 5, 9_800, 40_000, "refund", ""),
        ("reserve_inventory", 1, "compensate", "PENDING", 0, 0, None, None, "", ""),
        ("create_order", 0, "compensate", "PENDING", 0, 0, None, None, "", ""),
    )],
]

# The events each kind of order emitted, in order: (flow, kind, ordinal, event type, emitted ms).
# Each was published 50 ms after it was emitted.
EVENTS = [
    *[("orchestrated", "ok", n, t, ms) for n, (t, ms) in enumerate(
        [("ORDER_CREATED", 0), ("INVENTORY_RESERVED", 100), ("PAYMENT_PROCESSED", 480), ("ORDER_CONFIRMED", 715), ("FULFILLMENT_REQUESTED", 715)])],
    *[("orchestrated", "declined", n, t, ms) for n, (t, ms) in enumerate(
        [("ORDER_CREATED", 0), ("INVENTORY_RESERVED", 100), ("PAYMENT_FAILED", 490), ("INVENTORY_RELEASED", 510), ("ORDER_CANCELLED", 550)])],
    *[("orchestrated", "nostock", n, t, ms) for n, (t, ms) in enumerate(
        [("ORDER_CREATED", 0), ("STOCK_UNAVAILABLE", 130), ("ORDER_CANCELLED", 160)])],
    *[("orchestrated", "failed", n, t, ms) for n, (t, ms) in enumerate(
        [("ORDER_CREATED", 0), ("INVENTORY_RESERVED", 100), ("PAYMENT_PROCESSED", 480)])],
    *[("choreographed", "ok", n, t, ms) for n, (t, ms) in enumerate(
        [("ORDER_CREATED", 0), ("PAYMENT_PROCESSED", 300), ("INVENTORY_RESERVED", 600), ("ORDER_CONFIRMED", 900), ("FULFILLMENT_REQUESTED", 900)])],
    *[("choreographed", "declined", n, t, ms) for n, (t, ms) in enumerate(
        [("ORDER_CREATED", 0), ("PAYMENT_FAILED", 300), ("ORDER_CANCELLED", 600)])],
]
PUBLISH_MS = 50

# Which consumer handled which event of a choreographed order (its inbox row, 20 ms after the
# publication, and a delivery count of 1): (kind, event ordinal, consumer).
INBOX = [
    ("ok", 0, "payments"), ("ok", 1, "inventory"), ("ok", 2, "orders"),
    ("declined", 0, "payments"), ("declined", 1, "orders"), ("declined", 2, "payments"),
]

# Per kind: (saga state, saga finished ms, order status, order updated ms orchestrated / choreographed,
# reservation status or None, reservation updated ms, payment made)
KINDS = {
    "ok": ("COMPLETED", 735, "confirmed", (715, 900), "committed", (715, 900), True),
    "declined": ("COMPENSATED", 560, "cancelled", (550, 600), "released", (510, None), False),
    "nostock": ("COMPENSATED", 170, "cancelled", (160, None), None, (None, None), False),
    "failed": ("FAILED", 40_000, "pending", (0, None), "reserved", (100, None), True),
}


@dataclass(frozen=True)
class Loaded:
    sagas: int
    orders: int
    salt: str
    since: datetime
    until: datetime
    seconds: float  # all of it: rows_seconds writing the rows, then indexes_seconds and vacuum_seconds
    rows_seconds: float = 0.0
    indexes_seconds: float = 0.0
    vacuum_seconds: float = 0.0
    indexes_set_aside: bool = False  # built again in one sort after the rows (denser than grown insert by insert)


def history_load(
    *,
    sagas: int,
    until: datetime | None = None,
    span: timedelta = timedelta(days=6),
    chunk: int = 20_000,
    salt: str | None = None,
    progress: bool = True,
    vacuum: bool = True,
    set_aside_indexes: bool | None = None,
) -> Loaded:
    """Load `sagas` finished place_order sagas (and N // 10 choreographed orders) created evenly
    over `span` up to `until` (default an hour ago). Needs PostgreSQL and products in stock (their
    on_hand must cover what the history took out). With `vacuum`, VACUUM ANALYZE the tables after
    (needs autocommit: not inside a transaction). `set_aside_indexes` (by default for 50,000 sagas
    or more): drop the loaded tables' secondary indexes and build them again after, one sort each
    instead of a random insertion per row; the unique ones check the loaded rows as they are built."""
    from tqdm import tqdm

    if connection.vendor != "postgresql":
        raise RuntimeError("history_load needs PostgreSQL")
    started = time.monotonic()
    until = until or timezone.now() - timedelta(hours=1)
    since = until - span
    salt = salt or secrets.token_hex(4)
    orders = sagas + sagas // 10
    customers = max(1, orders // CUSTOMER_ORDERS)
    params = {"salt": salt, "since": since, "step_us": span / timedelta(microseconds=1) / max(orders, 1)}
    if set_aside_indexes is None:
        set_aside_indexes = sagas >= 50_000
    with connection.cursor() as cursor:
        # The loaded rows are consistent by construction (tests/test_history.py): no need to wait
        # for each commit's flush, nor (as a superuser) to run the foreign keys' checks row by row.
        cursor.execute("SET synchronous_commit = off")
        cursor.execute("SET maintenance_work_mem = '256MB'")
        _try(cursor, "SET session_replication_role = replica")
        try:
            with transaction.atomic():
                _prepare(cursor, customers=customers, params=params)
            with _indexes_set_aside(cursor, _tables()[1:] if set_aside_indexes else [], progress=progress):
                with tqdm(total=orders, desc="history: loading orders", unit="", leave=False, position=1, disable=not progress) as bar:
                    for lo in range(0, orders, chunk):
                        hi = min(orders, lo + chunk)
                        with transaction.atomic():
                            _load_chunk(cursor, {**params, "lo": lo, "hi": hi, "customers": customers})
                        bar.update(hi - lo)
                rows_done = time.monotonic()
            indexes_done = time.monotonic()
            with transaction.atomic():
                _adjust_stock(cursor)
        finally:
            cursor.execute("DROP TABLE IF EXISTS h_customer, h_product, h_step, h_event, h_inbox, h_kind, h_stock, h_line, h_order, h_reservation")
            _try(cursor, "RESET session_replication_role")
            cursor.execute("RESET maintenance_work_mem")
            cursor.execute("RESET synchronous_commit")
        if vacuum:
            for table in _tables():
                cursor.execute(f"VACUUM ANALYZE {table}")
    done = time.monotonic()
    return Loaded(
        sagas=sagas, orders=orders, salt=salt, since=since, until=until, seconds=round(done - started, 1),
        rows_seconds=round(rows_done - started, 1), indexes_seconds=round(indexes_done - rows_done, 1),
        vacuum_seconds=round(done - indexes_done, 1), indexes_set_aside=set_aside_indexes,
    )


def _try(cursor, sql: str) -> bool:
    """Run `sql`, or carry on without it when this role may not (in a savepoint: a test's
    transaction stays usable)."""
    try:
        with transaction.atomic():
            cursor.execute(sql)
        return True
    except DatabaseError:
        return False


@contextmanager
def _indexes_set_aside(cursor, tables: list[str], *, progress: bool):
    """Without the secondary indexes and unique constraints of `tables` (primary keys and what a
    foreign key needs stay) inside, with the same ones built again after, under the same names."""
    from tqdm import tqdm

    cursor.execute(
        """SELECT ic.relname, c.conname, t.relname,
                  CASE WHEN c.oid IS NULL THEN pg_get_indexdef(i.indexrelid) ELSE pg_get_constraintdef(c.oid) END
           FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid JOIN pg_class ic ON ic.oid = i.indexrelid
           LEFT JOIN pg_constraint c ON c.conindid = i.indexrelid AND c.contype = 'u'
           WHERE t.relname = ANY(%s) AND t.relnamespace = 'public'::regnamespace AND NOT i.indisprimary
             AND NOT EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' AND f.conindid = i.indexrelid)
           ORDER BY t.relname, ic.relname""",
        [tables],
    )
    aside = cursor.fetchall()
    with transaction.atomic():
        for index, constraint, table, _ in aside:
            cursor.execute(f'ALTER TABLE "{table}" DROP CONSTRAINT "{constraint}"' if constraint else f'DROP INDEX "{index}"')
    try:
        yield
    finally:
        for index, constraint, table, definition in tqdm(aside, desc="history: building indexes", leave=False, position=1, disable=not progress):
            with transaction.atomic():
                cursor.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT "{constraint}" {definition}' if constraint else definition)


def _tables() -> list[str]:
    from django.contrib.auth import get_user_model

    from inventory.models import Reservation, Stock
    from orders.models import IdempotencyRecord, Order, OrderItem
    from payments.models import Payment
    from sagas.models import ConsumerDelivery, InboxMessage, OutboxEvent, SagaInstance, StepExecution

    models = [get_user_model(), SagaInstance, StepExecution, Order, OrderItem, IdempotencyRecord, Reservation, Stock, Payment,
              OutboxEvent, InboxMessage, ConsumerDelivery]
    return [m._meta.db_table for m in models]


def _prepare(cursor, *, customers: int, params: dict) -> None:
    """The session's lookup tables: customers (created now), products, and the templates above."""
    from django.contrib.auth import get_user_model

    from inventory.models import Product, Stock
    from orders.sagas import place_order

    user_table = get_user_model()._meta.db_table
    cursor.execute("CREATE TEMP TABLE h_customer (k int PRIMARY KEY, user_id int NOT NULL)")
    cursor.execute(
        f"""WITH ins AS (
                INSERT INTO {user_table} (password, is_superuser, username, first_name, last_name, email, is_staff, is_active, date_joined)
                SELECT '!', false, 'hist-' || %(salt)s || '-' || k, '', '', '', false, true, %(since)s
                FROM generate_series(0, %(customers)s - 1) AS k
                RETURNING id, username)
            INSERT INTO h_customer SELECT split_part(username, '-', 3)::int, id FROM ins""",
        {**params, "customers": customers},
    )
    # Products of one currency (an order never mixes currencies), the most common one.
    cursor.execute(
        f"""CREATE TEMP TABLE h_product AS
            SELECT (row_number() OVER (ORDER BY p.id) - 1)::int AS idx, p.id, p.sku, p.price, p.currency
            FROM {Product._meta.db_table} p JOIN {Stock._meta.db_table} s ON s.product_id = p.id
            WHERE p.currency = (SELECT currency FROM {Product._meta.db_table} GROUP BY currency ORDER BY count(*) DESC LIMIT 1)"""
    )
    cursor.execute("SELECT count(*) FROM h_product")
    products = cursor.fetchone()[0]
    if products < 3:
        raise RuntimeError("history_load needs at least 3 products with stock (of one currency)")
    params["products"] = products
    params["fingerprint"] = place_order.fingerprint
    params["deadline_us"] = place_order.deadline / timedelta(microseconds=1)
    cursor.execute(
        """CREATE TEMP TABLE h_step (kind text, name text, position int, direction text, state text, attempts int,
               deliveries int, started_ms int, finished_ms int, error text, result text)"""
    )
    cursor.executemany("INSERT INTO h_step VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)", STEPS)
    cursor.execute("CREATE TEMP TABLE h_event (flow text, kind text, n int, event_type text, at_ms int)")
    cursor.executemany("INSERT INTO h_event VALUES (%s, %s, %s, %s, %s)", EVENTS)
    cursor.execute("CREATE TEMP TABLE h_inbox (kind text, n int, consumer text)")
    cursor.executemany("INSERT INTO h_inbox VALUES (%s, %s, %s)", INBOX)
    cursor.execute(
        """CREATE TEMP TABLE h_kind (kind text, saga_state text, saga_ms int, order_status text, order_ms_o int,
               order_ms_c int, reservation text, reservation_ms_o int, reservation_ms_c int, paid bool)"""
    )
    cursor.executemany(
        "INSERT INTO h_kind VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        [(k, s, sm, os_, om[0], om[1], r, rm[0], rm[1], p) for k, (s, sm, os_, om, r, rm, p) in KINDS.items()],
    )
    cursor.execute("CREATE TEMP TABLE h_stock (product_id bigint, committed bigint, reserved bigint)")


def _load_chunk(cursor, p: dict) -> None:
    """Orders lo..hi-1: every row of each, table by table."""
    from inventory.models import Reservation
    from orders.models import IdempotencyRecord, Order, OrderItem
    from payments.models import Payment
    from sagas.models import ConsumerDelivery, InboxMessage, OutboxEvent, SagaInstance, StepExecution

    cursor.execute("DROP TABLE IF EXISTS h_line, h_order, h_reservation")  # in a test's transaction ON COMMIT comes late
    # One row per order line: 1 to 3 lines of distinct products, 1 to 3 units each.
    cursor.execute(
        """CREATE TEMP TABLE h_line AS
           SELECT i, l, pr.id AS product_id, pr.sku, pr.price, pr.currency, 1 + (i + l) %% 3 AS quantity
           FROM generate_series(%(lo)s::bigint, %(hi)s::bigint - 1) AS i
           CROSS JOIN LATERAL generate_series(0, (i / 7) %% 3) AS l
           JOIN h_product pr ON pr.idx = (i * 37 + l) %% %(products)s""",
        p,
    )
    # One row per order, with everything its rows are made of.
    cursor.execute(
        """CREATE TEMP TABLE h_order AS
           SELECT o.*,
                  CASE WHEN o.flow = 'orchestrated' THEN md5(%(salt)s || ':s:' || o.i)::uuid END AS saga_id,
                  CASE WHEN o.kind = 'declined' THEN 'pm_declined' ELSE 'pm_ok' END AS payment_method,
                  CASE o.kind WHEN 'declined' THEN CASE o.flow WHEN 'orchestrated' THEN %(declined)s ELSE 'payment failed: ' || %(declined)s END
                              WHEN 'nostock' THEN o.nostock ELSE '' END AS cancel_reason
           FROM (
               SELECT l.i, md5(%(salt)s || ':o:' || l.i)::uuid AS order_id,
                      CASE WHEN l.i %% %(every)s = %(every)s - 1 THEN 'choreographed' ELSE 'orchestrated' END AS flow,
                      CASE WHEN l.i %% %(every)s <> %(every)s - 1 AND l.i %% 1000 = 500 THEN 'failed'
                           WHEN l.i %% 20 = 7 THEN 'declined'
                           WHEN l.i %% %(every)s <> %(every)s - 1 AND l.i %% 100 = 13 THEN 'nostock'
                           ELSE 'ok' END AS kind,
                      %(since)s::timestamptz + make_interval(secs => l.i * %(step_us)s / 1e6) AS t0,
                      c.user_id AS owner_id,
                      sum(l.price * l.quantity) AS total, min(l.currency) AS currency,
                      jsonb_agg(jsonb_build_object('sku', l.sku, 'quantity', l.quantity) ORDER BY l.l) AS items_list,
                      jsonb_object_agg(l.product_id::text, l.quantity) AS items_map,
                      string_agg('["' || l.sku || '",' || l.quantity || ']', ',' ORDER BY l.sku, l.quantity) AS canonical_items,
                      'out of stock (' || min(l.sku) || ': wanted ' || min(l.quantity) || ', available 0)' AS nostock,
                      'ch_' || left(md5(%(salt)s || ':p:' || l.i), 16) AS charge
               FROM h_line l JOIN h_customer c ON c.k = l.i %% %(customers)s
               GROUP BY l.i, c.user_id
           ) o""",
        {**p, "every": CHOREOGRAPHED_EVERY, "declined": DECLINED},
    )
    cursor.execute("CREATE INDEX ON h_order (i)")
    cursor.execute("ANALYZE h_order")
    ms = "make_interval(secs => ({}) / 1000.0)".format  # an offset in milliseconds from o.t0
    cursor.execute(
        f"""INSERT INTO {SagaInstance._meta.db_table} (id, name, version, definition_fingerprint, state, idempotency_key, input,
                failure_reason, created_at, updated_at, finished_at, deadline_at, stuck_after, redrives)
            SELECT o.saga_id, 'place_order', 1, %(fingerprint)s, k.saga_state, 'order:' || o.order_id,
                   jsonb_build_object('order_id', o.order_id::text),
                   CASE o.kind WHEN 'declined' THEN 'step process_payment failed: ' || %(declined_error)s
                               WHEN 'nostock' THEN 'step reserve_inventory failed: OutOfStock: ' || o.nostock || ' (at inventory/services.py:44)'
                               WHEN 'failed' THEN 'compensation process_payment failed: ' || %(refund_error)s ELSE '' END,
                   o.t0, o.t0 + {ms('k.saga_ms')}, o.t0 + {ms('k.saga_ms')},
                   o.t0 + make_interval(secs => %(deadline_us)s / 1e6), NULL, 0
            FROM h_order o JOIN h_kind k USING (kind) WHERE o.flow = 'orchestrated'""",
        {**p, "declined_error": DECLINED_ERROR, "refund_error": REFUND_ERROR},
    )
    cursor.execute(
        f"""INSERT INTO {Order._meta.db_table} (id, owner_id, status, total, currency, payment_method, flow, saga_id, cancel_reason,
                created_at, updated_at)
            SELECT o.order_id, o.owner_id, k.order_status, o.total, o.currency, o.payment_method, o.flow, o.saga_id, o.cancel_reason,
                   o.t0, o.t0 + {ms("CASE o.flow WHEN 'orchestrated' THEN k.order_ms_o ELSE k.order_ms_c END")}
            FROM h_order o JOIN h_kind k USING (kind)"""
    )
    cursor.execute(
        f"""INSERT INTO {OrderItem._meta.db_table} (order_id, product_id, sku, quantity, unit_price)
            SELECT o.order_id, l.product_id, l.sku, l.quantity, l.price FROM h_line l JOIN h_order o USING (i) ORDER BY l.i, l.l"""
    )
    cursor.execute(
        f"""INSERT INTO {IdempotencyRecord._meta.db_table} (owner_id, key, fingerprint, state, order_id, created_at)
            SELECT o.owner_id, 'hist-' || %(salt)s || '-' || o.i,
                   encode(sha256(convert_to('{{"items":[' || o.canonical_items || '],"payment_method":"' || o.payment_method
                                            || '","flow":"' || o.flow || '"}}', 'UTF8')), 'hex'),
                   'done', o.order_id, o.t0
            FROM h_order o""",
        p,
    )
    # Reservations are keyed by the saga (choreographed: by the order, its correlation id); their
    # ids go into reserve_inventory's result.
    cursor.execute("CREATE TEMP TABLE h_reservation (saga_id uuid PRIMARY KEY, ids jsonb)")
    cursor.execute(
        f"""WITH ins AS (
                INSERT INTO {Reservation._meta.db_table} (saga_id, product_id, quantity, status, created_at, updated_at)
                SELECT coalesce(o.saga_id, o.order_id), l.product_id, l.quantity, k.reservation,
                       o.t0 + {ms("CASE o.flow WHEN 'orchestrated' THEN 100 ELSE 600 END")},
                       o.t0 + {ms("CASE o.flow WHEN 'orchestrated' THEN k.reservation_ms_o ELSE k.reservation_ms_c END")}
                FROM h_line l JOIN h_order o USING (i) JOIN h_kind k USING (kind)
                WHERE k.reservation IS NOT NULL AND (o.flow = 'orchestrated' OR o.kind = 'ok')
                ORDER BY l.i, l.product_id
                RETURNING id, saga_id, product_id)
            INSERT INTO h_reservation SELECT saga_id, jsonb_agg(id ORDER BY product_id) FROM ins GROUP BY saga_id"""
    )
    cursor.execute(
        """INSERT INTO h_stock
           SELECT l.product_id, sum(l.quantity) FILTER (WHERE k.reservation = 'committed'),
                  sum(l.quantity) FILTER (WHERE k.reservation = 'reserved')
           FROM h_line l JOIN h_order o USING (i) JOIN h_kind k USING (kind)
           GROUP BY l.product_id"""
    )
    cursor.execute(
        f"""INSERT INTO {Payment._meta.db_table} (idempotency_key, reference, amount, currency, method, status, provider_reference, created_at)
            SELECT CASE o.flow WHEN 'orchestrated' THEN o.saga_id || ':process_payment' ELSE o.order_id || ':payment' END,
                   o.order_id::text, o.total, o.currency, o.payment_method, 'succeeded', o.charge,
                   o.t0 + {ms("CASE o.flow WHEN 'orchestrated' THEN 480 ELSE 300 END")}
            FROM h_order o JOIN h_kind k USING (kind) WHERE k.paid"""
    )
    cursor.execute(
        f"""INSERT INTO {StepExecution._meta.db_table} (saga_id, name, position, direction, state, attempts, deliveries, started_at,
                finished_at, last_error, reason, outcome_uncertain, result)
            SELECT o.saga_id, s.name, s.position, s.direction, s.state, s.attempts, s.deliveries,
                   o.t0 + {ms('s.started_ms')}, o.t0 + {ms('s.finished_ms')},
                   CASE s.error WHEN 'declined' THEN %(declined_error)s
                                WHEN 'nostock' THEN 'OutOfStock: ' || o.nostock || ' (at inventory/services.py:44)'
                                WHEN 'refund' THEN %(refund_error)s WHEN 'notify' THEN %(notify_error)s ELSE '' END,
                   CASE s.error WHEN 'declined' THEN %(declined)s WHEN 'nostock' THEN o.nostock ELSE '' END,
                   s.error = 'notify',
                   CASE s.result
                       WHEN 'order' THEN jsonb_build_object('total', o.total::text, 'order_id', o.order_id::text)
                       WHEN 'payment' THEN jsonb_build_object('amount', o.total::text, 'payment', o.charge)
                       WHEN 'reservations' THEN jsonb_build_object('reservations', r.ids)
                   END
            FROM h_order o JOIN h_step s USING (kind) LEFT JOIN h_reservation r ON r.saga_id = o.saga_id
            WHERE o.flow = 'orchestrated'
            ORDER BY o.i, s.direction DESC, s.position""",
        {"declined_error": DECLINED_ERROR, "refund_error": REFUND_ERROR, "notify_error": NOTIFY_ERROR, "declined": DECLINED},
    )
    # The events' payloads as the services write them (sagas.outbox; DjangoJSONEncoder: money as strings).
    # Consumed when published: the redelivery sweep of a live system closed these long ago
    # (sagas.consumers), so the history is not a backlog it first has to work through.
    cursor.execute(
        f"""INSERT INTO {OutboxEvent._meta.db_table} (id, aggregate_type, aggregate_id, event_type, payload, created_at, published_at,
                consumed_at, attempts, next_attempt_at, last_error, dead_lettered_at)
            SELECT md5(%(salt)s || ':e:' || o.i || ':' || e.n)::uuid, 'order', o.order_id::text, e.event_type,
                   CASE e.event_type
                       WHEN 'ORDER_CREATED' THEN jsonb_build_object('order_id', o.order_id::text, 'owner_id', o.owner_id,
                           'total', o.total::text, 'currency', o.currency, 'payment_method', o.payment_method, 'flow', o.flow,
                           'items', o.items_list)
                       WHEN 'INVENTORY_RESERVED' THEN jsonb_build_object('order_id', o.order_id::text, 'items', o.items_map, 'flow', o.flow)
                       WHEN 'INVENTORY_RELEASED' THEN jsonb_build_object('order_id', o.order_id::text, 'items', o.items_map)
                       WHEN 'PAYMENT_PROCESSED' THEN jsonb_build_object('order_id', o.order_id::text, 'amount', o.total::text,
                           'currency', o.currency, 'payment', o.charge, 'flow', o.flow)
                       WHEN 'PAYMENT_FAILED' THEN jsonb_build_object('order_id', o.order_id::text, 'reason', %(declined)s, 'flow', o.flow)
                       WHEN 'STOCK_UNAVAILABLE' THEN jsonb_build_object('order_id', o.order_id::text, 'reason', o.nostock, 'flow', o.flow)
                       WHEN 'ORDER_CANCELLED' THEN jsonb_build_object('order_id', o.order_id::text, 'reason', o.cancel_reason, 'flow', o.flow)
                       ELSE jsonb_build_object('order_id', o.order_id::text, 'total', o.total::text, 'currency', o.currency)
                   END,
                   o.t0 + {ms('e.at_ms')}, o.t0 + {ms('e.at_ms + %(publish_ms)s')}, o.t0 + {ms('e.at_ms + %(publish_ms)s')}, 0, NULL, '', NULL
            FROM h_order o JOIN h_event e USING (flow, kind)
            ORDER BY o.i, e.n""",
        {**p, "declined": DECLINED, "publish_ms": PUBLISH_MS},
    )
    for table, extra_columns, extra_values in (
        (InboxMessage._meta.db_table, ", event_type, received_at", f", e.event_type, o.t0 + {ms('e.at_ms + %(publish_ms)s + 20')}"),
        (ConsumerDelivery._meta.db_table, ", deliveries", ", 1"),
    ):
        cursor.execute(
            f"""INSERT INTO {table} (consumer, event_id{extra_columns})
                SELECT h.consumer, md5(%(salt)s || ':e:' || o.i || ':' || h.n)::uuid{extra_values}
                FROM h_order o JOIN h_inbox h USING (kind) JOIN h_event e ON e.flow = o.flow AND e.kind = o.kind AND e.n = h.n
                WHERE o.flow = 'choreographed'
                ORDER BY o.i, h.n""",
            {**p, "publish_ms": PUBLISH_MS},
        )


def _adjust_stock(cursor) -> None:
    """What the history took out of stock (committed) and still holds (the FAILED sagas' reservations)."""
    from inventory.models import Stock

    cursor.execute(
        f"""UPDATE {Stock._meta.db_table} s
            SET on_hand = s.on_hand - coalesce(d.committed, 0), reserved = s.reserved + coalesce(d.reserved, 0)
            FROM (SELECT product_id, sum(committed) AS committed, sum(reserved) AS reserved FROM h_stock GROUP BY product_id) d
            WHERE s.product_id = d.product_id"""
    )
