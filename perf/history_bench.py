"""The history phase of `make bench` (`python -m perf.bench --history N`): what the hot paths cost
with an empty saga log and again after N finished sagas were bulk-loaded (perf.history).

Each hot path is timed several times (the median is reported) at 0 and at N, in the same database,
and every SELECT, UPDATE and DELETE it sent is run again under `EXPLAIN (ANALYZE, BUFFERS)` to
show how PostgreSQL reached the rows at N: an index, or a sequential scan over the whole history.
Needs Django set up on the benchmark's PostgreSQL database and its worker running (perf.measure).
"""

from __future__ import annotations

import json
import re
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import DatabaseError, connection, transaction
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from perf.history import history_load

# Tables the history fills: a sequential scan of one of these at N reads the whole history.
HISTORY_TABLES = (
    "sagas_sagainstance", "sagas_stepexecution", "sagas_outboxevent", "sagas_inboxmessage", "sagas_consumerdelivery",
    "orders_order", "orders_orderitem", "orders_idempotencyrecord", "inventory_reservation", "payments_payment", "auth_user",
)
RELAY_BATCH = 50  # events waiting for "relay, a small batch waiting"
# The engine's own hot paths among the measured queries: the report lists their statements' plans.
ENGINE_QUERIES = (
    "sweeper, nothing to do", "relay claim, nothing waiting", f"relay, {RELAY_BATCH} events waiting", "step run in process, per step",
    "consumers redelivery sweep", "outbox cleanup, nothing to delete", "health: database facts", "system check: versions in use",
)


def history_phase(plan, owner, products, *, repeat: int = 5) -> dict:
    """Measure at 0, load plan.history sagas, measure at N. Returns the results for the report."""
    from perf.measure import HEADLINE_CONCURRENCY, _variant_run
    from sagas.testing import CeleryWorker, subprocess_environment

    size = plan.history
    throughput_sagas = max(50, plan.sagas // 4)
    staff = superuser()
    results: dict = {"sagas": size, "repeat": repeat, "throughput_sagas": throughput_sagas, "web_deadline_s": settings.WEB_DB_DEADLINE}
    with CeleryWorker(concurrency=HEADLINE_CONCURRENCY, include=["perf.baseline"], env=subprocess_environment()) as worker:

        def throughput(key: str, count: int = throughput_sagas) -> dict:
            run = _variant_run(worker, "orchestrated", count, owner, products, key=f"history-{key}", seed=hash(key) % 1000)
            return {"sagas": run["count"], "per_s": round(run["per_s"], 1)}

        throughput("warmup", max(20, throughput_sagas // 5))  # warms the worker up, not measured
        results["throughput_at_0"] = throughput("at-0")
        results["at_0"] = measure_point(staff=staff, customer=owner, history_customer=None, repeat=repeat)
        loaded = history_load(sagas=size)
        results["load"] = {
            "seconds": loaded.seconds, "rows_seconds": loaded.rows_seconds, "indexes_seconds": loaded.indexes_seconds,
            "vacuum_seconds": loaded.vacuum_seconds, "orders": loaded.orders, "since": loaded.since.isoformat(), "until": loaded.until.isoformat(),
        }
        results["tables"] = table_sizes()
        history_customer = get_user_model().objects.filter(username__startswith=f"hist-{loaded.salt}-").order_by("pk").first()
        results["at_n"] = measure_point(staff=staff, customer=owner, history_customer=history_customer, repeat=repeat)
        results["throughput_at_n"] = throughput("at-n")
    return results


def superuser():
    user, _ = get_user_model().objects.get_or_create(username="bench-admin", defaults={"is_staff": True, "is_superuser": True})
    return user


# --- one measuring point --------------------------------------------------------------------------


def measure_point(*, staff, customer, history_customer, repeat: int, extra: dict | None = None, admin: dict | None = None) -> dict:
    """{query: {"ms": median, "runs": [...], "queries": statements sent, "plan": how the history
    tables were read, ...}} for every hot path; None for one that cannot be measured at this point.
    `extra`: more checks (name: a function returning such a dict); `admin`: the admin pages to
    time instead of the saga and order lists and searches (name: path)."""
    from sagas import consumers, relay, services
    from sagas.publishers import RedisStreamPublisher
    from sagas.versions import versions_in_use

    now = timezone.now
    admin_client, bench_customer = client_for(staff), client_for(customer)
    old_customer = client_for(history_customer) if history_customer else None
    redeliver = lambda: consumers.consumers_redeliver(  # noqa: E731 - as the beat task calls it
        now=now(), min_age=timedelta(seconds=settings.CONSUMER_REDELIVER_AFTER),
        window=timedelta(hours=settings.CONSUMER_REDELIVER_WINDOW_HOURS),
    )
    measure = lambda fn, explain=True: lambda: timed(fn, repeat=repeat, explain=explain)  # noqa: E731
    if admin is None:
        some_saga, some_order = _latest("sagas_sagainstance"), _latest("orders_order")
        admin = {
            "admin: saga list": "/admin/sagas/sagainstance/",
            "admin: saga search by id": f"/admin/sagas/sagainstance/?q={some_saga}",
            "admin: order list": "/admin/orders/order/",
            "admin: order search by id": f"/admin/orders/order/?q={some_order}",
        }
    checks: dict[str, Callable[[], dict] | None] = {
        # the engine
        "sweeper, nothing to do": measure(lambda: services.saga_sweep(now=now())),
        "relay claim, nothing waiting": measure(relay_claim),
        f"relay, {RELAY_BATCH} events waiting": lambda: _relay_batch(RedisStreamPublisher(), repeat),
        "step run in process, per step": lambda: _step_run(customer, repeat),
        "consumers redelivery sweep": measure(redeliver),
        "outbox cleanup, nothing to delete": measure(relay.outbox_cleanup),
        "health: database facts": measure(_health_database_facts),
        "system check: versions in use": measure(versions_in_use),
        # the web
        "GET /api/health/ (staff)": measure(lambda: get_page(admin_client, "/api/health/"), explain=False),  # its queries run in threads
        "GET /api/orders/ (bench customer)": measure(lambda: get_page(bench_customer, "/api/orders/")),
        "GET /api/orders/ (a history customer)": measure(lambda: get_page(old_customer, "/api/orders/")) if old_customer else None,
        **{name: measure(lambda path=path: get_page(admin_client, path)) if path else None for name, path in admin.items()},
        **(extra or {}),
    }
    with web_settings():
        return {name: check() if check else None for name, check in checks.items()}


@contextmanager
def web_settings():
    """The admin's pages name their static files; without collectstatic's manifest, plainly. And a
    page is timed to its end: the report marks those past the request deadline (a 503 in production)."""
    plain_static = {**settings.STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}
    with override_settings(STORAGES=plain_static, WEB_DB_DEADLINE=600), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No directory at")  # whitenoise, for the same reason
        yield


def timed(fn: Callable[[], object], *, repeat: int, explain: bool) -> dict:
    """The median of `repeat` runs of `fn` (after one unmeasured run that warms caches), in ms, how
    many statements the last run sent on this thread's connection, and their plans."""
    fn()
    runs = []
    for n in range(repeat):
        with CaptureQueriesContext(connection) as captured:
            started = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - started) * 1000)
        if runs[-1] > 2000 and n >= 2:
            break  # slow enough that three runs say it
    result = {"ms": round(statistics.median(runs), 2), "runs": [round(r, 2) for r in runs], "queries": len(captured.captured_queries)}
    if explain:
        result.update(_plans(explain_all([q["sql"] for q in captured.captured_queries])))
    return result


def _plans(plans: list[dict]) -> dict:
    """Each statement's plan ("_plans": left out of the JSON report) and the table cell for them."""
    return {"_plans": plans, "plan": plan_cell(plans), "seq_scans": seq_scans_of_history(plans)}


def get_page(client: Client, path: str) -> None:
    response = client.get(path, secure=True)
    if response.status_code != 200:
        raise RuntimeError(f"GET {path} answered {response.status_code}")


def client_for(user) -> Client:
    client = Client(HTTP_HOST="127.0.0.1")
    client.force_login(user)
    return client


def _latest(table: str) -> str | None:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT id FROM {table} ORDER BY created_at DESC LIMIT 1")
        row = cursor.fetchone()
    return str(row[0]) if row else None


def relay_claim() -> None:
    from sagas.relay import claimable

    with transaction.atomic():
        list(claimable(timezone.now()).select_for_update(skip_locked=True)[: settings.OUTBOX_BATCH_SIZE])


def _relay_batch(publisher, repeat: int) -> dict:
    """Emit a small batch (one transaction, no kick: this process relays it) and time the relay."""
    from sagas.outbox import outbox_emit
    from sagas.relay import outbox_relay

    runs = []
    with override_settings(OUTBOX_RELAY_KICK=False):
        for _ in range(repeat + 1):
            with transaction.atomic():
                for n in range(RELAY_BATCH):
                    outbox_emit(aggregate_type="history", aggregate_id=n, event_type="TICK", payload={"n": n})
            started = time.perf_counter()
            result = outbox_relay(publisher=publisher, time_budget=5)
            runs.append((time.perf_counter() - started) * 1000)
            if result.published != RELAY_BATCH:
                raise RuntimeError(f"the relay published {result.published} of {RELAY_BATCH} waiting events")
    runs = runs[1:]  # the first warmed the caches
    return {"ms": round(statistics.median(runs), 2), "runs": [round(r, 2) for r in runs]}


def _step_run(customer, repeat: int) -> dict:
    """A new order's first two steps run by the runner in this process, each inside a transaction
    that is rolled back after (no message is sent: the on-commit dispatch never fires). Per step."""
    from orders.services import LineRequest, order_place
    from sagas import runner
    from sagas.definition import FORWARD

    skus = _skus(2)
    runs, plans = [], []
    for n in range(repeat + 1):
        with transaction.atomic():
            order = order_place(owner=customer, lines=[LineRequest(sku, 1) for sku in skus], payment_method="pm_ok",
                                idempotency_key=f"history-step-{time.time_ns()}-{n}").order
            with CaptureQueriesContext(connection) as captured:
                started = time.perf_counter()
                for step in ("create_order", "reserve_inventory"):
                    result = runner.step_run(saga_id=order.saga_id, step_name=step, direction=FORWARD, republish=lambda: None)
                    if result.outcome is not runner.Outcome.DONE:
                        raise RuntimeError(f"step {step} of saga {order.saga_id}: {result.outcome} {result.error}")
                runs.append((time.perf_counter() - started) * 1000 / 2)
            if n == repeat:
                plans = explain_all([q["sql"] for q in captured.captured_queries])
            transaction.set_rollback(True)
    runs = runs[1:]
    return {"ms": round(statistics.median(runs), 2), "runs": [round(r, 2) for r in runs], **_plans(plans)}


def _skus(count: int) -> list[str]:
    from inventory.models import Product

    return list(Product.objects.order_by("pk").values_list("sku", flat=True)[:count])


def _health_database_facts() -> None:
    from config import health

    health._database_facts(settings.HEALTH_CHECK_TIMEOUT)  # closes the connection after: the next use opens one


# --- plans ----------------------------------------------------------------------------------------


def explain_all(statements: list[str]) -> list[dict]:
    """EXPLAIN (ANALYZE, BUFFERS) of each distinct SELECT, UPDATE and DELETE, in a transaction that
    is rolled back: {"sql", "ms", "scans"}, "scans" naming how each table was read."""
    plans, seen = [], set()
    for sql in statements:
        head = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
        if head not in ("SELECT", "UPDATE", "DELETE", "WITH") or sql in seen:
            continue
        seen.add(sql)
        plan = explain(sql)
        if plan is not None:
            plans.append(plan)
    return plans


def explain(sql: str) -> dict | None:
    try:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + sql.replace("%", "%%"))
                document = cursor.fetchone()[0]
            transaction.set_rollback(True)
    except DatabaseError as exc:
        return {"sql": sql, "ms": None, "scans": [f"EXPLAIN failed: {type(exc).__name__}"]}
    document = json.loads(document) if isinstance(document, str) else document
    root = document[0]
    return {"sql": sql, "ms": round(root.get("Execution Time", 0.0), 3), "scans": sorted(set(scans(root["Plan"])))}


def scans(node: dict) -> list[str]:
    """How each table (and index) under this plan node is read, e.g. "Index Scan saga_stuck_idx"
    or "Seq Scan sagas_outboxevent"."""
    found = []
    kind = node.get("Node Type", "")
    if kind.endswith("Scan") and ("Relation Name" in node or "Index Name" in node):
        target = node.get("Index Name") or node.get("Relation Name")
        if kind == "Bitmap Heap Scan":
            target = node["Relation Name"]
        found.append(f"{kind} {target}")
    for child in node.get("Plans", []):
        found += scans(child)
    return found


def gist(sql: str, limit: int = 160) -> str:
    """A statement short enough to read in a list: no quotes, no column list."""
    sql = re.sub(r"^SELECT (DISTINCT )?.*? FROM ", r"SELECT \1... FROM ", " ".join(sql.replace('"', "").split()))
    return _short(sql, limit)


def _short(sql: str, limit: int = 400) -> str:
    sql = " ".join(sql.split())
    return sql if len(sql) <= limit else sql[:limit] + " ..."


def seq_scans_of_history(plans: list[dict] | None) -> list[str]:
    """The sequential scans of history tables in these plans."""
    return sorted({s for p in plans or [] for s in p["scans"] if s.startswith("Seq Scan") and s.split()[-1] in HISTORY_TABLES})


def table_sizes() -> dict:
    """Rows (as ANALYZE counted them) and total size with indexes, per history table."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT relname, reltuples::bigint, pg_total_relation_size(oid) FROM pg_class WHERE relname = ANY(%s) ORDER BY relname",
            [list(HISTORY_TABLES)],
        )
        return {name: {"rows": rows, "mib": round(size / 2**20, 1)} for name, rows, size in cursor.fetchall()}


# --- the report -----------------------------------------------------------------------------------


def markdown(history: dict) -> list[str]:
    """The history section of the benchmark report."""
    n = history["sagas"]
    load = history["load"]
    lines = [
        f"## Flat cost as the log grows: 0 and {n:,} finished sagas",
        "",
        f"{n:,} finished place_order sagas ({load['orders']:,} orders with the choreographed ones) were bulk-loaded in "
        f"**{load['seconds']} s** ({load['rows_seconds']} s writing the rows, {load['indexes_seconds']} s building the indexes set "
        f"aside meanwhile, {load['vacuum_seconds']} s VACUUM ANALYZE) with their steps, events, inbox rows, payments, reservations "
        f"and idempotency records (perf/history.py), created between {load['since'][:16]} and {load['until'][:16]}. Each query is the median of "
        f"{history['repeat']} runs, in ms; the plan column names how PostgreSQL read the history tables at {n:,} "
        "(from `EXPLAIN (ANALYZE, BUFFERS)` of every statement the query sent; **bold**: a sequential scan of a history table).",
        "",
    ]
    t0, tn = history["throughput_at_0"], history["throughput_at_n"]
    deadline_ms = history.get("web_deadline_s", 4.0) * 1000
    lines += [
        f"Orchestrated throughput at saturation ({t0['sagas']} orders, 2 worker processes): "
        f"**{t0['per_s']} sagas/s at 0, {tn['per_s']} sagas/s at {n:,}** (placed while the worker does not consume, "
        "timed from release to the last settled order, as in the saga rounds).",
        "",
        f"| query | ms at 0 | ms at {n:,} | plan at {n:,} |",
        "|---|---|---|---|",
    ]
    for name, at_n in history["at_n"].items():
        at_0 = history["at_0"].get(name)
        if at_n is None:
            continue
        late = f" (over the {deadline_ms / 1000:g} s request deadline: a 503 in production)" if name.startswith(("GET", "admin")) and at_n["ms"] > deadline_ms else ""
        lines.append(f"| {name} | {at_0['ms'] if at_0 else '-'} | {at_n['ms']}{late} | {at_n.get('plan', '-')} |")
    lines += ["", f"The engine's statements at {n:,}, one by one (ms as EXPLAIN ANALYZE measured it):", ""]
    for name, at_n in history["at_n"].items():
        if name not in ENGINE_QUERIES:
            continue
        for statement in (at_n or {}).get("_plans", []):
            if any(table in statement["sql"] for table in HISTORY_TABLES):
                lines.append(f"- {name}: `{gist(statement['sql'])}`: {', '.join(statement['scans'])}, {statement['ms']} ms")
    lines += ["", "Rows and size (with indexes) at the end:", "", "| table | rows | MiB |", "|---|---|---|"]
    for table, size in history["tables"].items():
        lines.append(f"| {table} | {size['rows']:,} | {size['mib']} |")
    lines.append("")
    return lines


def plan_cell(plans: list[dict] | None) -> str:
    """Sequential scans of history tables first (bold), then the indexes read."""
    if plans is None:
        return "-"
    seq = seq_scans_of_history(plans)
    indexed = sorted({s for p in plans for s in p["scans"] if not s.startswith("Seq Scan")})
    cell = [f"**{s}**" for s in seq] + indexed[:8]
    return ", ".join(cell) if cell else "(no table read)"
