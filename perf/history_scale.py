"""The measurements of the scale benchmark (`make bench-history`, perf.bench_history): what the
engine and the pages around it cost with an empty saga log and with N finished sagas, side by side
in one run. Needs Django set up on the benchmark's PostgreSQL database (perf.bench_history).

In order:
1. At 0: a worker places the orders the pages need (a full API page for the bench customer, one
   order for a customer of one order), then every check of `scale_point` is timed, and a backlog of
   `drain_events` events is drained by one relay, with the planner's statistics as they are and
   again analysed.
2. N finished sagas are bulk-loaded (perf.history); storage is measured before and after.
3. At N: the same checks on the same URLs, and the same drain.
4. Throughput, alternated: rounds of `place_order` at saturation on a twin database with an empty
   log and on the loaded one, in turn (who goes first rotates), each round in a process and with a
   worker of its own; the ratio is taken pair by pair, so a slow spell of the machine weighs on both
   sides of it.
5. Keys: `key_sagas` sagas with their steps inserted at N with random (version 4) and time-ordered
   (version 7 layout) UUID keys, in alternated rounds.
6. Retention, when the beat has a pruning task: history older than any retention window is loaded,
   pruned by the beat's own tasks, and the rows and storage compared with before.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta
from urllib.parse import urlencode, urlsplit

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection
from django.utils import timezone

from perf.common import REPO, paired_ratios, recreate_database, spread
from perf.history import history_load
from perf.history_bench import HISTORY_TABLES, client_for, get_page, measure_point, superuser, timed

BACKLOG_EVENTS = 5_000  # waiting when the relay's claim is timed
BACKLOG_PER_AGGREGATE = 5  # an order's events
CHECKED_ORDERS = 60  # orders of the bench customer at 0: a full API page, and what place_orders checks
# The periodic jobs the engine's own checks time (measure_point), by beat task; the beat's other
# tasks are timed as the worker runs them ("beat task <name>"), its pruning ones in the retention part.
ENGINE_JOBS = {
    "sagas.sweep": "sweeper, nothing to do",
    "sagas.relay_outbox": "relay claim, nothing waiting",
    "sagas.outbox_cleanup": "outbox cleanup, nothing to delete",
    "sagas.consumers_redeliver": "consumers redelivery sweep",
}
PRUNE_TASK = re.compile(r"prune|retention|purge", re.IGNORECASE)
# The admin lists of these apps are timed (and auth's users: one per customer).
ADMIN_APPS = ("sagas", "orders", "inventory", "payments")
# History loaded for the retention part ends this long ago: past any retention window up to a year.
RETENTION_AGE = timedelta(days=400)


# --- one point: 0 or N ------------------------------------------------------------------------------


def scale_point(*, pages: dict, repeat: int, backlog: int = BACKLOG_EVENTS) -> dict:
    """Every check of measure_point (the engine's hot paths, health, the order API) plus the relay's
    claim with `backlog` events waiting, the other periodic jobs, every admin list, filter and
    search of `pages` (admin_lists, admin_filters, admin_searches), the order API for a customer of one order, and place_orders'
    own checks on the bench customer's first orders."""
    one_order = client_for(pages["one_order_customer"])
    claims = backlog_claims(backlog, repeat=repeat)
    extra = {
        **{name: (lambda result=result: result) for name, result in claims.items()},
        **{f"beat task {task}": (lambda task=task: timed(beat_task(task), repeat=repeat, explain=True)) for task in other_beat_tasks()},
        "GET /api/orders/ (a customer with 1 order)": lambda: timed(lambda: get_page(one_order, "/api/orders/"), repeat=repeat, explain=True),
        f"place_orders' checks ({len(pages['checked_orders'])} orders)": lambda: timed(
            lambda: place_orders_checks(pages["checked_orders"]), repeat=repeat, explain=True
        ),
    }
    return measure_point(
        staff=pages["staff"], customer=pages["bench_customer"], history_customer=pages.get("history_customer"),
        repeat=repeat, extra=extra, admin={**pages["lists"], **pages["filters"], **admin_searches(pages)},
    )


def backlog_claims(count: int, *, repeat: int) -> dict[str, dict]:
    """The relay's claim (its SELECT ... FOR UPDATE SKIP LOCKED of one batch) with `count` events
    waiting, BACKLOG_PER_AGGREGATE per aggregate as orders' events come: first with the planner's
    statistics as they are (a live system's: on a table of millions, a backlog of thousands is far
    below autovacuum's ANALYZE threshold, 10% of the rows), then analysed. The backlog is deleted
    after and the table analysed again, as it was."""
    from perf.history_bench import relay_claim
    from sagas.models import OutboxEvent

    now = timezone.now()
    aggregates = max(1, count // BACKLOG_PER_AGGREGATE)
    OutboxEvent.objects.bulk_create(
        (OutboxEvent(aggregate_type="backlog", aggregate_id=str(n % aggregates), event_type="FILLER", payload={"n": n}, created_at=now)
         for n in range(count)),
        batch_size=5_000,
    )
    try:
        as_they_are = timed(relay_claim, repeat=repeat, explain=True)
        _analyze(OutboxEvent._meta.db_table)
        analysed = timed(relay_claim, repeat=repeat, explain=True)
    finally:
        OutboxEvent.objects.filter(aggregate_type="backlog", published_at__isnull=True).delete()
        _analyze(OutboxEvent._meta.db_table)
    return {f"relay claim, {count:,} waiting": as_they_are, f"relay claim, {count:,} waiting, statistics analysed": analysed}


def other_beat_tasks() -> list[str]:
    """The beat's tasks that the engine's checks do not time already, pruning ones aside."""
    return sorted({entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()} - set(ENGINE_JOBS) - set(prune_tasks()))


def prune_tasks() -> list[str]:
    """The beat's pruning tasks (issue 15's retention), by name: [] while there is none."""
    return sorted({entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values() if PRUNE_TASK.search(entry["task"])})


def beat_task(name: str) -> Callable[[], object]:
    """Run beat's task `name` in this process, as a worker would (its arguments from the schedule)."""
    from celery import current_app

    entry = next(e for e in settings.CELERY_BEAT_SCHEDULE.values() if e["task"] == name)
    current_app.loader.import_default_modules()  # every app's tasks module, as a worker imports them
    task = current_app.tasks[name]
    return lambda: task(*entry.get("args", ()), **entry.get("kwargs", {}))


def place_orders_checks(order_ids: list) -> None:
    """What `manage.py place_orders` checks after its orders settled: the outcomes and the shop's
    invariants over those orders."""
    from orders.models import Order
    from orders.selectors import order_outcomes, shop_invariant_violations

    order_outcomes(order_ids)
    shop_invariant_violations(Order.objects.filter(pk__in=order_ids))


# --- the admin's pages -------------------------------------------------------------------------------


def admin_models() -> list[tuple[type, object]]:
    """(model, its ModelAdmin) for every admin list the benchmark times."""
    from django.contrib import admin

    user = get_user_model()
    return sorted(
        ((model, model_admin) for model, model_admin in admin.site._registry.items()
         if model._meta.app_label in ADMIN_APPS or model is user),
        key=lambda pair: pair[0]._meta.label,
    )


def changelist_url(model) -> str:
    from django.urls import reverse

    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


def admin_lists() -> dict[str, str]:
    return {f"admin list: {model._meta.label_lower}": changelist_url(model) for model, _ in admin_models()}


def admin_filters(staff) -> dict[str, str]:
    """One page per list filter of every admin list: the filter's choice that the most rows match
    now (the common case, e.g. COMPLETED sagas; run at 0, where counting is cheap). Read from the
    admin itself, so a filter added or changed is timed without naming it here."""
    from django.test import RequestFactory

    factory = RequestFactory()

    def changelist(model_admin, url):
        request = factory.get(url)
        request.user = staff
        return model_admin.get_changelist_instance(request)

    pages = {}
    for model, model_admin in admin_models():
        base = changelist_url(model)
        unfiltered = changelist(model_admin, base)
        for spec in unfiltered.filter_specs:
            choices = [c for c in spec.choices(unfiltered) if not c["selected"]]
            if not choices:
                continue
            best = max(choices, key=lambda c: changelist(model_admin, base + c["query_string"]).result_count)  # first of equals
            pages[f"admin filter: {model._meta.label_lower} by {spec.title} = {best['display']}"] = base + best["query_string"]
    return pages


def admin_searches(pages: dict) -> dict[str, str | None]:
    """What an operator looks up: a saga, an order and its events, reservations and payment by id,
    an order by its customer, an inbox row by event id. The ids are the newest ones of the customer
    whose full API page is timed (or None when that kind of row does not exist at this point)."""
    from inventory.models import Reservation
    from orders.models import Order
    from sagas.models import InboxMessage

    customer = pages.get("history_customer") or pages["bench_customer"]
    order = Order.objects.filter(owner=customer).order_by("-created_at").first()
    saga_id = order.saga_id if order else None
    inbox = InboxMessage.objects.order_by("-received_at").values_list("event_id", flat=True).first()
    reservation = Reservation.objects.filter(saga_id=saga_id).values_list("saga_id", flat=True).first() if saga_id else None

    def search(model_path: str, term) -> str | None:
        return f"/admin/{model_path}/?{urlencode({'q': str(term)})}" if term else None

    return {
        "admin search: saga by id": search("sagas/sagainstance", saga_id),
        "admin search: order by id": search("orders/order", order and order.pk),
        "admin search: order by customer": search("orders/order", customer.get_username()),
        "admin search: outbox events by order id": search("sagas/outboxevent", order and order.pk),
        "admin search: inbox by event id": search("sagas/inboxmessage", inbox),
        "admin search: reservations by saga id": search("inventory/reservation", reservation),
        "admin search: payment by order id": search("payments/payment", order and order.pk),
    }


# --- drain, storage ----------------------------------------------------------------------------------


def drain(count: int, *, analyze: bool, max_seconds: float) -> dict:
    """A backlog of `count` events drained by one relay (perf.measure.relay_drain: from the first
    event published to the last), given up after `max_seconds`; with `analyze`, the planner's
    statistics brought up to date first, else as they are (see backlog_claims). Then the events
    are deleted with their stream, and the relay's memory of it (else the next drain would find
    the stream lost and recover it first)."""
    import redis

    from perf.measure import relay_drain
    from sagas.models import OutboxEvent, OutboxStream

    result = relay_drain(count, analyze=analyze, max_seconds=max_seconds)
    OutboxEvent.objects.filter(aggregate_type="drain").delete()
    OutboxStream.objects.filter(name="events.drain").delete()
    redis.Redis.from_url(settings.REDIS_URL).delete("events.drain")
    _vacuum(OutboxEvent._meta.db_table)
    return result


def drains(count: int, *, max_seconds: float) -> dict:
    """The drain with the statistics as they are (judged), then with them analysed (for comparison)."""
    return {"as_they_are": drain(count, analyze=False, max_seconds=max_seconds), "analysed": drain(count, analyze=True, max_seconds=max_seconds)}


def storage() -> dict:
    """Per history table: rows (as ANALYZE counted them) and bytes of the table (with TOAST) and of
    its indexes."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT relname, reltuples::bigint, pg_table_size(oid), pg_indexes_size(oid) FROM pg_class "
            "WHERE relname = ANY(%s) AND relkind = 'r' ORDER BY relname",
            [list(HISTORY_TABLES)],
        )
        return {name: {"rows": max(rows, 0), "table_bytes": table, "index_bytes": index} for name, rows, table, index in cursor.fetchall()}


def per_million(at_0: dict, at_n: dict, sagas: int) -> dict:
    """What the history added per table, scaled to a million sagas (MiB and rows)."""
    scale = 1_000_000 / sagas
    out = {}
    for table, n in at_n.items():
        zero = at_0.get(table, {"rows": 0, "table_bytes": 0, "index_bytes": 0})
        out[table] = {
            "rows": round((n["rows"] - zero["rows"]) * scale),
            "table_mib": round((n["table_bytes"] - zero["table_bytes"]) * scale / 2**20, 1),
            "index_mib": round((n["index_bytes"] - zero["index_bytes"]) * scale / 2**20, 1),
        }
    return out


def _analyze(table: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {table}")


def _vacuum(*tables: str, full: bool = False) -> None:
    """VACUUM (ANALYZE) the tables: needs autocommit, not a transaction."""
    with connection.cursor() as cursor:
        for table in tables:
            cursor.execute(f"VACUUM {'FULL ' if full else ''}ANALYZE {table}")


# --- throughput, alternated -----------------------------------------------------------------------


def throughput_alternated(*, empty_url: str, loaded_url: str, sagas: int, warmup: int, pairs: int) -> dict:
    """`pairs` pairs of rounds of `sagas` orchestrated orders at saturation, one on the empty log
    (`empty_url`, created here) and one on the loaded log, who goes first rotating. Each round runs
    in a process of its own with its own worker, warmed up with `warmup` untimed orders."""
    recreate_database(empty_url)
    rounds = []
    for n in range(pairs):
        sides = [("at_0", empty_url), ("at_n", loaded_url)]
        if n % 2:
            sides.reverse()
        rounds.append({side: _round_in_process(url, sagas=sagas, warmup=warmup, key=f"scale-{n}-{side}", seed=100 + n) for side, url in sides})
    drop_database(empty_url)
    ratios = paired_ratios([r["at_n"]["per_s"] for r in rounds], [r["at_0"]["per_s"] for r in rounds])
    cpu = paired_ratios([r["at_n"]["cpu_ms_per_order"] for r in rounds], [r["at_0"]["cpu_ms_per_order"] for r in rounds])
    return {
        "sagas": sagas, "warmup": warmup, "pairs": pairs, "rounds": rounds,
        "at_0": spread([r["at_0"]["per_s"] for r in rounds], digits=1),
        "at_n": spread([r["at_n"]["per_s"] for r in rounds], digits=1),
        "ratio": {**spread(ratios), "rounds": [round(r, 3) for r in ratios]},
        "cpu_ratio": {**spread(cpu), "rounds": [round(r, 3) for r in cpu]},
    }


def drop_database(url: str) -> None:
    import psycopg

    parts = urlsplit(url)
    admin = parts._replace(path="/postgres").geturl().replace("postgres://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{parts.path.lstrip("/")}" WITH (FORCE)')


def _round_in_process(database_url: str, *, sagas: int, warmup: int, key: str, seed: int) -> dict:
    spec = {"sagas": sagas, "warmup": warmup, "key": key, "seed": seed}
    env = {**os.environ, "DATABASE_URL": database_url}
    done = subprocess.run(
        [sys.executable, "-m", "perf.history_scale", json.dumps(spec)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        raise RuntimeError(f"throughput round {key} on {urlsplit(database_url).path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _round_main(spec: dict) -> dict:
    """One throughput round on this process's database (DATABASE_URL): migrated and seeded if new."""
    from django.core.management import call_command

    from perf.measure import HEADLINE_CONCURRENCY, _seed, _variant_run
    from sagas.testing import CeleryWorker, subprocess_environment

    call_command("migrate", verbosity=0)
    owner, products = _seed()
    with CeleryWorker(concurrency=HEADLINE_CONCURRENCY, include=["perf.baseline"], env=subprocess_environment()) as worker:
        _variant_run(worker, "orchestrated", spec["warmup"], owner, products, key=f"{spec['key']}-warmup", seed=spec["seed"])
        run = _variant_run(worker, "orchestrated", spec["sagas"], owner, products, key=spec["key"], seed=spec["seed"])
    return {"per_s": round(run["per_s"], 2), "wall_s": round(run["wall_s"], 2), "cpu_ms_per_order": round(run["cpu_s"] * 1000 / run["count"], 2)}


# --- keys: random against time-ordered -----------------------------------------------------------

# RFC 9562's version 7 in SQL: 48 bits of Unix time in ms, then the version (7) and variant bits over
# gen_random_uuid()'s random ones. Python 3.11 has no uuid7; uuid-utils and uuid6 on PyPI make them.
UUID7_SQL = (
    "encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) placing "
    "substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3) FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid"
)
KEYS = {"uuid4": "gen_random_uuid()", "uuid7": UUID7_SQL}
KEY_MARK = "keybench:"
KEY_BATCH = 50  # sagas per transaction
STEP_NAMES = ("create_order", "reserve_inventory", "process_payment", "notify_fulfillment")


def keys_compare(*, sagas: int, pairs: int) -> dict:
    """Insert `sagas` finished sagas with their four steps, KEY_BATCH per transaction, with random
    keys and with time-ordered ones, in alternated rounds (who goes first rotates); sagas/s per
    round and the ratio time-ordered / random pair by pair. The rows are deleted after."""
    runs: dict[str, list[float]] = {kind: [] for kind in KEYS}
    try:
        for n in range(pairs):
            kinds = list(KEYS) if n % 2 == 0 else list(reversed(KEYS))
            for kind in kinds:
                runs[kind].append(_key_round(KEYS[kind], sagas))
    finally:
        _keys_delete()
    ratios = paired_ratios(runs["uuid7"], runs["uuid4"])
    return {
        "sagas": sagas, "pairs": pairs, "batch": KEY_BATCH,
        **{kind: {**spread(r, digits=1), "rounds": [round(x, 1) for x in r]} for kind, r in runs.items()},
        "ratio": {**spread(ratios), "rounds": [round(r, 3) for r in ratios]},
    }


def _key_round(key_sql: str, sagas: int) -> float:
    """Sagas per second inserted with keys from `key_sql`, each transaction a batch of sagas and
    their steps, through every index and foreign key check the real tables have."""
    from sagas.models import SagaInstance, StepExecution

    steps = ", ".join(f"('{name}', {position})" for position, name in enumerate(STEP_NAMES))
    sql = f"""
        WITH s AS (
            INSERT INTO {SagaInstance._meta.db_table} (id, name, version, definition_fingerprint, state, idempotency_key, input,
                failure_reason, created_at, updated_at, finished_at, deadline_at, stuck_after, redrives)
            SELECT k.id, 'place_order', 1, '', 'COMPLETED', '{KEY_MARK}' || k.id, '{{}}', '', now(), now(), now(), NULL, NULL, 0
            FROM (SELECT {key_sql} AS id FROM generate_series(1, %s)) k
            RETURNING id)
        INSERT INTO {StepExecution._meta.db_table} (saga_id, name, position, direction, state, attempts, deliveries, started_at,
            finished_at, last_error, reason, outcome_uncertain, result)
        SELECT s.id, n.name, n.position, 'forward', 'COMPLETED', 1, 1, now(), now(), '', '', false, NULL
        FROM s CROSS JOIN (VALUES {steps}) AS n (name, position)"""
    started = time.perf_counter()
    with connection.cursor() as cursor:  # autocommit: one transaction per statement
        for done in range(0, sagas, KEY_BATCH):
            cursor.execute(sql, [min(KEY_BATCH, sagas - done)])
    return sagas / (time.perf_counter() - started)


def _keys_delete() -> None:
    from sagas.models import SagaInstance, StepExecution

    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {StepExecution._meta.db_table} WHERE saga_id IN "
            f"(SELECT id FROM {SagaInstance._meta.db_table} WHERE idempotency_key LIKE %s)",
            [KEY_MARK + "%"],
        )
        cursor.execute(f"DELETE FROM {SagaInstance._meta.db_table} WHERE idempotency_key LIKE %s", [KEY_MARK + "%"])
    _vacuum(SagaInstance._meta.db_table, StepExecution._meta.db_table)


# --- retention -------------------------------------------------------------------------------------


def retention_measure(*, sagas: int, prunes: dict[str, Callable[[], object]], repeat: int, max_seconds: float = 1800,
                      vacuum: bool = True) -> dict:
    """Storage bounded by the retention window: load `sagas` finished sagas that ended before
    RETENTION_AGE, run each pruning job (name: function) as beat would, again and again until it
    has nothing left to do, then time it once more with nothing to do. Rows and sizes of the history
    tables before the old history, with it and after pruning; {"available": False} with no job."""
    if not prunes:
        return {"available": False}
    before = _live_rows()
    loaded = history_load(sagas=sagas, until=timezone.now() - RETENTION_AGE, progress=False, vacuum=vacuum)
    with_old = _live_rows()
    size_with_old = storage()
    jobs = {}
    for name, prune in prunes.items():
        runs, started = [], time.monotonic()
        while time.monotonic() - started < max_seconds:
            began = time.perf_counter()
            result = prune()
            runs.append((time.perf_counter() - began) * 1000)
            if not _did_something(result):
                break
        jobs[name] = {"runs": len(runs), "ms_median": round(statistics.median(runs), 2), "ms_max": round(max(runs), 2),
                      "seconds": round(sum(runs) / 1000, 1), "idle": timed(prune, repeat=repeat, explain=True)}
    if vacuum:
        _vacuum(*HISTORY_TABLES)
    after = _live_rows()
    total = lambda rows: sum(rows.values())  # noqa: E731
    return {
        "available": True, "jobs": jobs, "old_sagas": sagas, "old_until": loaded.until.isoformat(),
        "rows": {"before": before, "with_old": with_old, "after": after},
        "storage": {"with_old": size_with_old, "after": storage()},
        "ratio": round(total(after) / max(1, total(before)), 4),
    }


def beat_prunes() -> dict[str, Callable[[], object]]:
    return {name: beat_task(name) for name in prune_tasks()}


def _did_something(result) -> bool:
    """A pruning run's result: a count, a dict of counts, a run's record (sagas.retention.PruneRun:
    `deleted`), or None (then once is enough)."""
    deleted = getattr(result, "deleted", None)
    if isinstance(deleted, int):
        return deleted > 0
    if isinstance(result, dict):
        return any(_did_something(v) for v in result.values())
    if isinstance(result, (list, tuple)):
        return any(_did_something(v) for v in result)
    return bool(result) and isinstance(result, int)


def _live_rows() -> dict[str, int]:
    """Exact rows per history table (count(*): the statistics lag behind a bulk delete)."""
    with connection.cursor() as cursor:
        counts = {}
        for table in HISTORY_TABLES:
            cursor.execute(f"SELECT count(*) FROM {table}")
            counts[table] = cursor.fetchone()[0]
    return counts


# --- the whole run -----------------------------------------------------------------------------------


def scale_run(plan, *, empty_url: str, prunes: dict | None = None) -> dict:
    """Everything in the module docstring's order; the results for perf.bench_history's report,
    with the wall time of each part."""
    import redis
    from django.core.management import call_command

    from perf.measure import HEADLINE_CONCURRENCY, _seed, _variant_run
    from sagas.testing import CeleryWorker, subprocess_environment

    call_command("migrate", verbosity=0)
    owner, products = _seed()
    for url in (settings.REDIS_URL, settings.CELERY_BROKER_URL):
        redis.Redis.from_url(url).flushdb()
    one_order_customer, _ = get_user_model().objects.get_or_create(username="bench-one-order")
    prunes = beat_prunes() if prunes is None else prunes
    results: dict = {"sagas": plan.history, "repeat": plan.repeat, "web_deadline_s": settings.WEB_DB_DEADLINE, "backlog_events": plan.backlog_events}
    part = _Parts(results, total=9)
    with part("orders at 0"):
        with CeleryWorker(concurrency=HEADLINE_CONCURRENCY, include=["perf.baseline"], env=subprocess_environment()) as worker:
            _variant_run(worker, "orchestrated", CHECKED_ORDERS, owner, products, key="scale-page", seed=1)
            _variant_run(worker, "orchestrated", 1, one_order_customer, products, key="scale-one", seed=2)
        staff = superuser()
        pages = {
            "staff": staff, "bench_customer": owner, "one_order_customer": one_order_customer,
            "checked_orders": list(owner.orders.order_by("created_at").values_list("pk", flat=True)[:CHECKED_ORDERS]),
            "lists": admin_lists(), "filters": admin_filters(staff),
        }
        results["admin_urls"] = pages["filters"]
    with part("at 0"):
        results["at_0"] = scale_point(pages=pages, repeat=plan.repeat, backlog=plan.backlog_events)
    with part("drain at 0", optional=True):
        results["drain_at_0"] = drains(plan.drain_events, max_seconds=plan.drain_max_seconds)
    with part("load"):
        storage_at_0 = storage()
        loaded = history_load(sagas=plan.history)
        with connection.cursor() as cursor:
            cursor.execute("CHECKPOINT")  # what the load left dirty is written now, not during the measurements
        results["load"] = {
            "seconds": loaded.seconds, "rows_seconds": loaded.rows_seconds, "indexes_seconds": loaded.indexes_seconds,
            "vacuum_seconds": loaded.vacuum_seconds, "orders": loaded.orders, "since": loaded.since.isoformat(), "until": loaded.until.isoformat(),
            "indexes_set_aside": loaded.indexes_set_aside,
        }
        storage_at_n = storage()
        results["storage"] = {"at_0": storage_at_0, "at_n": storage_at_n, "per_million": per_million(storage_at_0, storage_at_n, plan.history)}
    with part("at N"):
        pages["history_customer"] = get_user_model().objects.filter(username__startswith=f"hist-{loaded.salt}-").order_by("pk").first()
        results["history_customer_orders"] = pages["history_customer"].orders.count()
        results["at_n"] = scale_point(pages=pages, repeat=plan.repeat, backlog=plan.backlog_events)
    with part("drain at N", optional=True):
        results["drain_at_n"] = drains(plan.drain_events, max_seconds=plan.drain_max_seconds)
    with part("throughput", optional=True):
        connection.close()  # the rounds' processes have the database to themselves
        results["throughput"] = throughput_alternated(
            empty_url=empty_url, loaded_url=os.environ["DATABASE_URL"], sagas=plan.throughput_sagas, warmup=plan.warmup_sagas,
            pairs=plan.throughput_pairs,
        )
    with part("keys", optional=True):
        results["keys"] = keys_compare(sagas=plan.key_sagas, pairs=plan.key_pairs)
    with part("retention", optional=True):
        results["retention"] = retention_measure(sagas=plan.retention_sagas, prunes=prunes, repeat=plan.repeat)
    part.close()
    return results


class _Parts:
    """`with part(name):` times one part of the run into results["part_seconds"], under a progress
    bar. A part nothing after it needs (`optional`) that fails is recorded in results["failed"] and
    the run goes on: half an hour of measurements is not lost to one of them."""

    def __init__(self, results: dict, *, total: int):
        from tqdm import tqdm

        self.seconds = results.setdefault("part_seconds", {})
        self.failed = results.setdefault("failed", {})
        self.bar = tqdm(total=total, desc="bench-history", unit="part", position=0)

    @contextmanager
    def __call__(self, name: str, *, optional: bool = False):
        self.bar.set_postfix_str(name)
        started = time.monotonic()
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - recorded in the report, which says the run is incomplete
            if not optional:
                raise
            self.failed[name] = f"{type(exc).__name__}: {exc}"[:3000]
        self.seconds[name] = round(time.monotonic() - started, 1)
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


if __name__ == "__main__":  # one throughput round: python -m perf.history_scale '{"sagas": ..., ...}' (DATABASE_URL set)
    import django

    django.setup()
    print(json.dumps(_round_main(json.loads(sys.argv[1]))))
