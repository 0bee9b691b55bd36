"""The measurements of `make bench` (see perf.bench), one function each. Needs Django set up."""

from __future__ import annotations

import json
import multiprocessing
import random
import socket
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import psycopg
import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone
from rest_framework.authtoken.models import Token
from tqdm import tqdm

from inventory.models import Product
from inventory.services import product_create
from orders.models import Flow, Order, OrderStatus
from orders.services import LineRequest, order_place
from perf import baseline, embedded
from perf.common import REPO, summary_ms
from perf.services import free_port
from sagas.models import OutboxEvent
from sagas.outbox import outbox_emit
from sagas.publishers import RedisStreamPublisher, configured_publisher
from sagas.relay import outbox_relay
from sagas.testing import CeleryBeat, CeleryWorker, subprocess_environment

PRODUCTS = 200
API_RATE = 50.0  # requests/s, offered open loop
GUNICORN_WORKERS = 4  # sync workers: two per core, so one waiting on the database does not idle a core
OUTBOX_RATE = 200.0  # events/s, offered at a steady pace
WORKER_CONCURRENCY = 2
STEPS = 4  # accept, reserve, charge, confirm: the same four in every variant


def run_all(plan, *, only=None) -> dict:
    """Every measurement in turn, with one progress bar over the whole run."""
    call_command("migrate", verbosity=0)
    owner, products = _seed()
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    wanted = lambda name: only is None or name in only  # noqa: E731
    results: dict = {}
    phases = [
        ("reference", lambda: {"pg_commits_per_s": pg_commit_rate(plan.pg_commit_seconds), "noop_chain": noop_chains(plan.noop_chains)}),
        ("sagas", lambda: saga_variants(plan.sagas, owner, products)),
        ("outbox", lambda: outbox_latency(plan.outbox_seconds)),
        ("drain", lambda: relay_drain(plan.drain_events)),
        ("api", lambda: api_load(plan.api_seconds, owner, products)),
        ("embedded", lambda: embedded.compare(plan.embedded_orders)),  # own processes: after the worker stopped
    ]
    phases = [p for p in phases if wanted(p[0])]
    with tqdm(total=len(phases), desc="bench", unit="phase", position=0) as bar:
        worker = CeleryWorker(concurrency=WORKER_CONCURRENCY, include=["perf.baseline"], env=subprocess_environment())
        with worker:
            results["worker_rss_start_mib"] = worker_rss_mib(worker)
            for name, run in phases:
                if name == "api":
                    # The web tier on its own, as if on its own machine: with the worker running
                    # the sagas it starts, this measures two cores shared by both.
                    results["worker_rss_end_mib"] = worker_rss_mib(worker)
                    worker.stop()
                bar.set_postfix_str(name)
                results[name] = run()
                bar.update()
            if "worker_rss_end_mib" not in results:
                results["worker_rss_end_mib"] = worker_rss_mib(worker)
    return results


def _seed():
    for n in range(PRODUCTS):
        product_create(sku=f"BENCH-{n:03d}", name=f"Bench product {n}", price=Decimal("9.99") + n, on_hand=10_000_000)
    owner, _ = get_user_model().objects.get_or_create(username="bench")
    return owner, {p.sku: p for p in Product.objects.all()}


def _lines(rng: random.Random, products) -> list[tuple[str, int]]:
    skus = rng.sample(sorted(products), rng.randint(1, 3))
    return [(sku, rng.randint(1, 3)) for sku in skus]


# --- physical reference ---------------------------------------------------------------------------


def pg_commit_rate(seconds: float) -> float:
    """One client, one-row INSERT per transaction, as fast as PostgreSQL commits them."""
    with psycopg.connect(_libpq_url(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS bench_commit (id bigserial PRIMARY KEY, at timestamptz NOT NULL)")
        count, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            conn.execute("INSERT INTO bench_commit (at) VALUES (now())")
            count += 1
        conn.execute("DROP TABLE bench_commit")
    return round(count / seconds, 1)


def _libpq_url() -> str:
    s = connection.settings_dict
    return f"postgresql://{s['USER'] or ''}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def noop_chains(count: int) -> dict:
    """Chains of four no-op tasks on the same worker: the broker's and Celery's own cost."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(baseline.NOOP_DONE_KEY)
    started = time.monotonic()
    for _ in range(count):
        baseline.noop_chain_send()
    _wait_count(lambda: client.llen(baseline.NOOP_DONE_KEY), count, "no-op chains", timeout=300)
    wall = time.monotonic() - started
    latencies = [float(x) for x in client.lrange(baseline.NOOP_DONE_KEY, 0, -1)]
    return {"chains": count, "wall_s": round(wall, 2), "per_s": round(count / wall, 1), "latency": summary_ms(latencies)}


def _wait_count(current, total: int, desc: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with tqdm(total=total, desc=desc, unit="", leave=False, position=1) as bar:
        while (done := current()) < total:
            bar.update(done - bar.n)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{desc}: only {done} of {total} finished in {timeout:g}s (is the worker up?)")
            time.sleep(0.1)
        bar.update(total - bar.n)


# --- sagas --------------------------------------------------------------------------------------


def saga_variants(count: int, owner, products) -> dict:
    """Throughput at saturation and end-to-end latency of the same order process three ways."""
    # Two rounds, the variants taking turns, so that a slow spell of the machine or the growing
    # tables weigh on each variant alike.
    rounds = [
        {variant: _saga_run(variant, count // 2, owner, products, round_no=r) for variant in VARIANTS} for r in range(2)
    ]
    results = {variant: _combined([r[variant] for r in rounds]) for variant in VARIANTS}
    base, orch = results["baseline"], results["orchestrated"]
    results["orchestrated_vs_baseline"] = round(orch["per_s"] / base["per_s"], 3)
    results["choreographed_vs_baseline"] = round(results["choreographed"]["per_s"] / base["per_s"], 3)
    # What the engine adds to each step, in worker time: the difference in wall time per saga at
    # saturation, times the worker processes busy during it, spread over the four steps.
    per_saga = lambda r: r["wall_s"] / r["sagas"] * WORKER_CONCURRENCY  # noqa: E731
    results["orchestrated_step_overhead_ms"] = round((per_saga(orch) - per_saga(base)) / STEPS * 1000, 2)
    return results



VARIANTS = ("baseline", "orchestrated", "choreographed")


def _combined(runs: list[dict]) -> dict:
    sagas = sum(r["sagas"] for r in runs)
    wall = sum(r["wall_s"] for r in runs)
    latencies = [x for r in runs for x in r["_latencies"]]
    return {"sagas": sagas, "wall_s": round(wall, 2), "per_s": round(sagas / wall, 1), "rounds_per_s": [r["per_s"] for r in runs],
            "latency": summary_ms(latencies), "_latencies": latencies}


def _saga_run(variant: str, count: int, owner, products, *, round_no: int = 0) -> dict:
    rng = random.Random(7 + round_no)
    _settle_outbox()
    started = time.monotonic()
    order_ids = []
    for n in tqdm(range(count), desc=f"{variant}: placing", leave=False, position=1):
        lines = _lines(rng, products)
        if variant == "baseline":
            order = baseline.baseline_order_place(owner=owner, products=products, lines=lines, payment_method="pm_ok")
        else:
            order = order_place(
                owner=owner,
                lines=[LineRequest(sku, q) for sku, q in lines],
                payment_method="pm_ok",
                flow=Flow(variant),
                idempotency_key=f"bench-{variant}-{round_no}-{n}",
            ).order
        order_ids.append(order.pk)
    orders = Order.objects.filter(pk__in=order_ids)
    _wait_count(lambda: orders.exclude(status=OrderStatus.PENDING).count(), count, f"{variant}: settled", timeout=600)
    wall = time.monotonic() - started
    confirmed = orders.filter(status=OrderStatus.CONFIRMED).count()
    if confirmed != count:
        raise RuntimeError(f"{variant}: only {confirmed} of {count} orders confirmed with pm_ok")
    latencies = [(o.updated_at - o.created_at).total_seconds() for o in orders.only("created_at", "updated_at")]
    return {"sagas": count, "wall_s": round(wall, 2), "per_s": round(count / wall, 1), "latency": summary_ms(latencies), "_latencies": latencies}


def _settle_outbox(timeout: float = 120) -> None:
    """Let the previous variant's events drain so it does not bill the next one."""
    deadline = time.monotonic() + timeout
    while OutboxEvent.objects.filter(published_at__isnull=True).exists() and time.monotonic() < deadline:
        outbox_relay(publisher=configured_publisher(), time_budget=5)
        time.sleep(0.2)
    time.sleep(1)


# --- outbox ---------------------------------------------------------------------------------------

# One stream per mode: deleting a stream the relay has written to is a loss it repairs by
# publishing the retained events again (sagas.streams), which is not what is measured here.
OUTBOX_AGGREGATE = "bench_{mode}"


def outbox_latency(seconds: float) -> dict:
    """Commit-to-publish latency at a steady offered rate: the time from an event's commit until a
    reader of its Redis stream sees it. Once with only the beat's relay, once with the kick."""
    results = {}
    for mode, kick in (("beat_only", False), ("kick", True)):
        with CeleryBeat(env=subprocess_environment()):
            results[mode] = _outbox_steady(seconds, kick=kick, mode=mode)
    results["rate_per_s"] = OUTBOX_RATE
    results["relay_interval_s"] = settings.OUTBOX_RELAY_INTERVAL
    return results


def _outbox_steady(seconds: float, *, kick: bool, mode: str) -> dict:
    aggregate = OUTBOX_AGGREGATE.format(mode=mode)
    total = int(seconds * OUTBOX_RATE)
    reader_out = multiprocessing.Queue()
    reader = multiprocessing.Process(target=_stream_reader, args=(settings.REDIS_URL, f"events.{aggregate}", total, seconds + 30, reader_out))
    reader.start()
    time.sleep(0.5)
    committed: dict[str, float] = {}
    interval = 1 / OUTBOX_RATE
    start = time.monotonic()
    with override_settings(OUTBOX_RELAY_KICK=kick):
        for n in tqdm(range(total), desc=f"outbox {mode}", leave=False, position=1):
            pause = start + n * interval - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            with transaction.atomic():
                event = outbox_emit(aggregate_type=aggregate, aggregate_id=n % 50, event_type="TICK", payload={"n": n})
            committed[str(event.id)] = time.time()
    offered = total / (time.monotonic() - start)
    arrived = reader_out.get(timeout=seconds + 60)
    reader.join()
    latencies = [arrived[i] - committed[i] for i in committed if i in arrived]
    return {"events": total, "offered_per_s": round(offered, 1), "received": len(latencies), "latency": summary_ms(latencies), "_latencies": latencies}


def _stream_reader(url: str, stream: str, total: int, timeout: float, out) -> None:
    """In its own process: when each event id first appears on the stream (wall clock)."""
    client = redis.Redis.from_url(url)
    seen: dict[str, float] = {}
    last_id, deadline = "0-0", time.monotonic() + timeout
    while len(seen) < total and time.monotonic() < deadline:
        for _, entries in client.xread({stream: last_id}, block=200, count=1000) or []:
            now = time.time()
            for entry_id, fields in entries:
                last_id = entry_id
                seen.setdefault(fields[b"id"].decode(), now)
    out.put(seen)


def relay_drain(count: int) -> dict:
    """A backlog of `count` events (5 per aggregate, like an order's) drained by one relay
    process publishing to Redis Streams."""
    OutboxEvent.objects.filter(published_at__isnull=True).update(published_at=timezone.now())
    now = timezone.now()
    aggregates = max(1, count // 5)
    with tqdm(total=count, desc="drain: backlog", leave=False, position=1) as bar:
        for chunk in range(0, count, 5000):
            OutboxEvent.objects.bulk_create(
                OutboxEvent(aggregate_type="drain", aggregate_id=str(n % aggregates), event_type="FILLER", payload={"n": n}, created_at=now)
                for n in range(chunk, min(count, chunk + 5000))
            )
            bar.update(min(5000, count - chunk))
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sagas_outboxevent")
    publisher = RedisStreamPublisher()
    published = 0
    started = time.monotonic()
    with tqdm(total=count, desc="drain: relaying", leave=False, position=1) as bar:
        while published < count:
            result = outbox_relay(publisher=publisher, time_budget=0.5)
            published += result.published
            bar.update(result.published)
            if result.published == 0:
                break
    wall = time.monotonic() - started
    return {"events": count, "published": published, "wall_s": round(wall, 2), "per_s": round(published / wall, 1), "batch_size": settings.OUTBOX_BATCH_SIZE}


# --- API ------------------------------------------------------------------------------------------


def api_load(seconds: float, owner, products) -> dict:
    """POST /api/orders/ under an open-loop load from another process, on gunicorn, while the
    worker runs the sagas it starts."""
    token, _ = Token.objects.get_or_create(user=owner)
    port = free_port()
    env = subprocess_environment()
    gunicorn = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "config.wsgi", f"--bind=127.0.0.1:{port}", f"--workers={GUNICORN_WORKERS}", "--preload", "--log-level=warning"],
        cwd=REPO,
        env=env,
    )
    try:
        _wait_http(port)
        skus = sorted(products)[:50]
        out = subprocess.run(
            [sys.executable, "-m", "perf.loadgen", f"--url=http://127.0.0.1:{port}/api/orders/", f"--token={token.key}",
             f"--rate={API_RATE}", f"--seconds={seconds}", f"--skus={','.join(skus)}"],
            cwd=REPO, env=env, capture_output=True, text=True, check=True,
        )
    finally:
        gunicorn.terminate()
        gunicorn.wait(30)
    report = json.loads(out.stdout)
    latencies = report.pop("latencies")
    sent_at = report.pop("sent_at")
    slow = sorted(zip(latencies, sent_at), reverse=True)[:10]
    report["slowest"] = [{"sent_at_s": round(at, 2), "ms": round(lat * 1000, 1)} for lat, at in slow]
    return {**report, "latency": summary_ms(latencies), "_latencies": latencies, "gunicorn_workers": GUNICORN_WORKERS}


def _wait_http(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"gunicorn did not listen on {port} in {timeout}s")


# --- worker memory --------------------------------------------------------------------------------


def worker_rss_mib(worker: CeleryWorker) -> dict:
    """Resident memory of the worker's main process and of its largest pool child."""
    children = worker.children()
    return {"main": _rss_mib(worker.process.pid), "largest_child": max((_rss_mib(pid) for pid in children), default=None)}


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None
