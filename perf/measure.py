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
from celery import current_app, signature
from celery.utils.nodenames import host_format
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models import Max
from django.test import override_settings
from django.utils import timezone
from rest_framework.authtoken.models import Token
from tqdm import tqdm

from inventory.models import Product
from inventory.services import product_create
from orders.models import Flow, Order, OrderStatus
from orders.services import LineRequest, order_place
from perf import baseline, embedded
from perf.common import REPO, paired_ratios, process_cpu_seconds, spread, summary_ms
from perf.history_bench import history_phase
from perf.services import free_port
from sagas import dispatch
from sagas.models import OutboxEvent
from sagas.outbox import kick_mark_clear, outbox_emit
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
    """Every measurement in turn, with one progress bar over the whole run. Each phase that needs a
    worker starts its own: the sagas one per concurrency of the sweep, the outbox one with
    WORKER_CONCURRENCY processes; the API phase runs with none (the web tier alone)."""
    call_command("migrate", verbosity=0)
    owner, products = _seed()
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    redis.Redis.from_url(settings.CELERY_BROKER_URL).flushdb()
    wanted = lambda name: only is None or name in only  # noqa: E731
    results: dict = {}
    phases = [
        ("reference", lambda: {"pg_commits_per_s": pg_commit_rate(plan.pg_commit_seconds)}),
        ("sagas", lambda: saga_sweep(plan, owner, products)),
        ("outbox", lambda: outbox_latency(plan.outbox_seconds)),
        ("drain", lambda: relay_drain(plan.drain_events)),
        ("api", lambda: api_load(plan.api_seconds, owner, products)),
        ("embedded", lambda: embedded.compare(plan.embedded_orders)),  # own processes: after the worker stopped
        # Last: its bulk load leaves PostgreSQL checkpointing and vacuuming for a while, which the
        # phases after it would measure (the API's first requests took 300 ms after it).
        ("history", lambda: history_phase(plan, owner, products)),
    ]
    phases = [p for p in phases if wanted(p[0])]
    phases = [p for p in phases if p[0] != "history" or getattr(plan, "history", 0)]
    with tqdm(total=len(phases), desc="bench", unit="phase", position=0) as bar:
        for name, run in phases:
            bar.set_postfix_str(name)
            results[name] = run()
            bar.update()
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


def _wait_count(current, total: int, desc: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with tqdm(total=total, desc=desc, unit="", leave=False, position=1) as bar:
        while (done := current()) < total:
            bar.update(max(0, done - bar.n))
            if time.monotonic() > deadline:
                raise RuntimeError(f"{desc}: only {done} of {total} finished in {timeout:g}s (is the worker up?)")
            time.sleep(0.1)
        bar.update(total - bar.n)


# --- sagas --------------------------------------------------------------------------------------
#
# Each variant runs the same number of orders (chains, for the no-op chain) per round, and the
# variants take turns within a round (who goes first rotates), so a slow spell of the machine or the
# growing tables weigh on each alike; the first round is a warm-up and is not counted. Placement is
# kept out of the timed window: the worker stops consuming its queue (Celery's cancel_consumer), the
# round's orders are placed through the real placement path, their on-commit messages wait in the
# broker, and the clock starts when the worker takes the first of them. See perf/bench.py's docstring.

VARIANTS = ("orchestrated", "choreographed", "baseline", "naive_chain", "noop_chain")
RATIOS = {  # name: (numerator, denominator), in throughput
    "orchestrated_vs_baseline": ("orchestrated", "baseline"),
    "choreographed_vs_baseline": ("choreographed", "baseline"),
    "orchestrated_vs_naive_chain": ("orchestrated", "naive_chain"),
    "orchestrated_vs_noop_chain": ("orchestrated", "noop_chain"),
}
HEADLINE_CONCURRENCY = WORKER_CONCURRENCY  # the targets are judged at this many worker processes


def saga_sweep(plan, owner, products) -> dict:
    """The saga rounds once per worker concurrency of the plan, each on a worker of its own."""
    by_concurrency = {}
    for concurrency in plan.concurrencies:
        with CeleryWorker(concurrency=concurrency, include=["perf.baseline"], env=subprocess_environment()) as worker:
            by_concurrency[str(concurrency)] = saga_rounds(worker, concurrency, plan, owner, products)
    return {"headline_concurrency": HEADLINE_CONCURRENCY, "by_concurrency": by_concurrency}


def saga_rounds(worker: CeleryWorker, concurrency: int, plan, owner, products) -> dict:
    """Throughput at saturation, worker CPU per order and released -> settled latency of the
    variants, over plan.rounds rounds after an untimed warm-up round."""
    rss_start = worker_rss_mib(worker)
    for variant in VARIANTS:
        _variant_run(worker, variant, plan.warmup_sagas, owner, products, key=f"c{concurrency}-warmup", seed=1)
    runs = []
    for n in range(plan.rounds):
        turn = VARIANTS[n % len(VARIANTS):] + VARIANTS[: n % len(VARIANTS)]
        runs.append({v: _variant_run(worker, v, plan.sagas, owner, products, key=f"c{concurrency}-r{n}", seed=100 + n) for v in turn})
    results = {
        "concurrency": concurrency,
        "rounds": plan.rounds,
        "per_round": plan.sagas,
        "warmup_per_round": plan.warmup_sagas,
        "variants": {v: _variant_summary([run[v] for run in runs]) for v in VARIANTS},
        "ratios": {},
    }
    for name, (a, b) in RATIOS.items():
        ratios = paired_ratios([run[a]["per_s"] for run in runs], [run[b]["per_s"] for run in runs])
        results["ratios"][name] = {**spread(ratios), "rounds": [round(r, 3) for r in ratios]}
    # What the engine adds to each step, in worker time: the difference in wall time per saga at
    # saturation against the fair baseline of the same round, times the worker processes busy
    # during it, spread over the four steps.
    overhead = [
        (run["orchestrated"]["wall_s"] - run["baseline"]["wall_s"]) * concurrency / plan.sagas / STEPS * 1000 for run in runs
    ]
    results["orchestrated_step_overhead_ms"] = {**spread(overhead, digits=2), "rounds": [round(x, 2) for x in overhead]}
    # The same in CPU time of the worker (less sensitive to other load on the machine).
    cpu = [(run["orchestrated"]["cpu_s"] - run["baseline"]["cpu_s"]) / plan.sagas / STEPS * 1000 for run in runs]
    results["orchestrated_step_cpu_overhead_ms"] = {**spread(cpu, digits=2), "rounds": [round(x, 2) for x in cpu]}
    results["worker_rss_mib"] = {"start": rss_start, "end": worker_rss_mib(worker)}
    return results


def _variant_summary(runs: list[dict]) -> dict:
    latencies = [x for r in runs for x in r["_latencies"]]
    return {
        "per_s": spread([r["per_s"] for r in runs], digits=1),
        "rounds_per_s": [round(r["per_s"], 1) for r in runs],
        "cpu_ms_per_order": spread([r["cpu_s"] * 1000 / r["count"] for r in runs], digits=1),
        "latency": summary_ms(latencies),
        "_latencies": latencies,
    }


def _variant_run(worker: CeleryWorker, variant: str, count: int, owner, products, *, key: str, seed: int) -> dict:
    """One variant's turn in a round: `count` orders placed while the worker does not consume, then
    timed from the moment it consumes again until all of them settled and their events were
    published. Orders are drawn from `seed`, so every variant of a round places the same ones."""
    rng = random.Random(seed)
    marks = redis.Redis.from_url(settings.REDIS_URL)
    _wait_worker_idle()
    _consuming(worker, False)
    marks.delete(baseline.ROUND_START_KEY)
    baseline.round_start.si().apply_async()  # first in the queue: the clock starts when it runs
    try:
        with override_settings(OUTBOX_RELAY_KICK=False):  # one kick at the release instead, below
            placed = _place(variant, count, rng, owner, products, key=f"{key}-{variant}")
    except BaseException:
        _consuming(worker, True)
        raise
    # The relay's on-commit kicks would have expired in the queue while placement went on; one
    # kick at the release stands for them, in every variant alike.
    kick_mark_clear()
    dispatch.send(signature("sagas.relay_outbox"))
    placed_at = time.time()
    cpu_before = worker_cpu_seconds(worker)
    _consuming(worker, True)
    _wait_count(placed.settled, count, f"{variant}: settled", timeout=600)
    cpu = worker_cpu_seconds(worker) - cpu_before
    placed.check()
    # From when the worker took the first message (not when add_consumer was sent: the consumer
    # takes a moment to poll the broker again) until the last order settled.
    started = float(marks.lindex(baseline.ROUND_START_KEY, 0))
    if started < placed_at:
        raise RuntimeError(f"{variant}: the worker took messages while the orders were being placed")
    wall = placed.finished_at() - started
    return {"count": count, "wall_s": wall, "per_s": count / wall, "cpu_s": cpu, "_latencies": [t - started for t in placed.settled_at()]}


def _place(variant: str, count: int, rng: random.Random, owner, products, *, key: str):
    """Place `count` orders of `variant` (send `count` no-op chains), on-commit messages and all."""
    if variant == "noop_chain":
        client = redis.Redis.from_url(settings.REDIS_URL)
        client.delete(baseline.NOOP_DONE_KEY)
        for _ in tqdm(range(count), desc=f"{variant}: sending", leave=False, position=1):
            baseline.noop_chain_send()
        return _NoopChainsSent(client, count)
    since = timezone.now()
    ids = []
    for n in tqdm(range(count), desc=f"{variant}: placing", leave=False, position=1):
        lines = _lines(rng, products)
        if variant == "naive_chain":
            ids.append(baseline.naive_order_place(owner=owner, products=products, lines=lines, payment_method="pm_ok").pk)
            continue
        request = {"owner": owner, "lines": [LineRequest(sku, q) for sku, q in lines], "payment_method": "pm_ok", "idempotency_key": f"bench-{key}-{n}"}
        if variant == "baseline":
            ids.append(baseline.fair_order_place(**request).order.pk)
        else:
            ids.append(order_place(**request, flow=Flow(variant)).order.pk)
    return _OrdersPlaced(variant, ids, since)


class _OrdersPlaced:
    """A round's orders of one variant: settled once none is pending and every outbox event has
    been published (the relay's work is part of each variant's)."""

    def __init__(self, variant: str, ids: list, since):
        self.variant, self.orders, self.since = variant, Order.objects.filter(pk__in=ids), since

    def settled(self) -> int:
        settled = self.orders.exclude(status=OrderStatus.PENDING).count()
        if settled and OutboxEvent.objects.filter(published_at__isnull=True).exists():
            return settled - 1  # not done until the events are out, whatever the orders say
        return settled

    def check(self) -> None:
        confirmed = self.orders.filter(status=OrderStatus.CONFIRMED).count()
        if confirmed != self.orders.count():
            raise RuntimeError(f"{self.variant}: only {confirmed} of {self.orders.count()} orders confirmed with pm_ok")

    def settled_at(self) -> list[float]:
        return [at.timestamp() for at in self.orders.values_list("updated_at", flat=True)]

    def finished_at(self) -> float:
        """When the last order settled or the last of their events was published, whichever is later."""
        published = OutboxEvent.objects.filter(created_at__gte=self.since).aggregate(last=Max("published_at"))["last"]
        return max([*self.settled_at(), *([published.timestamp()] if published else [])])


class _NoopChainsSent:
    def __init__(self, client, count: int):
        self.client, self.count = client, count

    def settled(self) -> int:
        return self.client.llen(baseline.NOOP_DONE_KEY)

    def check(self) -> None:
        pass

    def settled_at(self) -> list[float]:
        return [float(x) for x in self.client.lrange(baseline.NOOP_DONE_KEY, 0, -1)]

    def finished_at(self) -> float:
        return max(self.settled_at())


def _consuming(worker: CeleryWorker, consume: bool) -> None:
    """Make the worker stop or start again consuming its queues (Celery's remote control: the
    worker and its pool stay up, warm), once it has said it did. Both queues: with one left, the
    consumer's pending BRPOP on it would delay consuming again by up to a second."""
    control = current_app.control
    command = control.add_consumer if consume else control.cancel_consumer
    for queue in (settings.CELERY_TASK_DEFAULT_QUEUE, settings.SAGAS_CONTROL_QUEUE):
        if not command(queue, destination=[host_format(worker.name)], reply=True, limit=1, timeout=10):
            raise RuntimeError(f"the worker did not answer {command.__name__}({queue}) within 10 s")
    if not consume:
        _end_pending_brpop()


def _end_pending_brpop(timeout: float = 5.0) -> None:
    """After cancel_consumer, the BRPOP the consumer issued before it may still wait (up to a
    second) and would take the next message pushed, only to give it back at the far end of the
    queue, behind the round's orders. End it now: CLIENT UNBLOCK answers it as a timeout, and with
    no queue left the consumer issues no other. Only the worker blocks on the bench's broker
    database."""
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    db = broker.connection_pool.connection_kwargs.get("db", 0)
    deadline = time.monotonic() + timeout
    while blocked := [c["id"] for c in broker.client_list() if int(c["db"]) == db and "b" in c["flags"]]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker's consumer still waits on the broker after {timeout:g} s")
        for client_id in blocked:
            broker.client_unblock(client_id)
        time.sleep(0.01)


def _wait_worker_idle(timeout: float = 120) -> None:
    """Until nothing waits in the default queue and no message is taken but not yet acked: what a
    previous run left (a late relay kick, an ack) must not run in the next one's window."""
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    _settle_outbox()
    deadline = time.monotonic() + timeout
    while broker.llen(settings.CELERY_TASK_DEFAULT_QUEUE) or broker.hlen("unacked"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker was still busy after {timeout:g} s")
        time.sleep(0.05)
    time.sleep(0.05)


def worker_cpu_seconds(worker: CeleryWorker) -> float:
    """CPU time the worker has used so far: its main process (consuming, sending), its pool
    children (running tasks), and any child that exited meanwhile."""
    return process_cpu_seconds(worker.process.pid, reaped_children=True) + sum(process_cpu_seconds(pid) for pid in worker.children())


def _settle_outbox(timeout: float = 120) -> None:
    """Publish what a previous run left unpublished (normally nothing: a run counts as settled
    only once its events are out), so it does not bill the next one."""
    deadline = time.monotonic() + timeout
    while OutboxEvent.objects.filter(published_at__isnull=True).exists() and time.monotonic() < deadline:
        outbox_relay(publisher=configured_publisher(), time_budget=5)
        time.sleep(0.2)


# --- outbox ---------------------------------------------------------------------------------------

# One stream per mode: deleting a stream the relay has written to is a loss it repairs by
# publishing the retained events again (sagas.streams), which is not what is measured here.
OUTBOX_AGGREGATE = "bench_{mode}"


def outbox_latency(seconds: float) -> dict:
    """Commit-to-publish latency at a steady offered rate: the time from an event's commit until a
    reader of its Redis stream sees it. Once with only the beat's relay, once with the kick."""
    results = {}
    with CeleryWorker(concurrency=WORKER_CONCURRENCY, env=subprocess_environment()):
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


def relay_drain(count: int, *, analyze: bool = True, max_seconds: float | None = None) -> dict:
    """A backlog of `count` events (5 per aggregate, like an order's) drained by one relay
    process publishing to Redis Streams. With `analyze`, the planner's statistics are brought up
    to date first; with `max_seconds`, the relay is stopped then ("stopped": True), and the rate is
    what it published meanwhile."""
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
    if analyze:
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE sagas_outboxevent")
    publisher = RedisStreamPublisher()
    published, stopped = 0, False
    started = time.monotonic()
    with tqdm(total=count, desc="drain: relaying", leave=False, position=1) as bar:
        while published < count:
            result = outbox_relay(publisher=publisher, time_budget=0.5)
            published += result.published
            bar.update(result.published)
            if result.published == 0:
                break
            if max_seconds is not None and time.monotonic() - started > max_seconds:
                stopped = True
                break
    wall = time.monotonic() - started
    return {"events": count, "published": published, "wall_s": round(wall, 2), "per_s": round(published / wall, 1),
            "batch_size": settings.OUTBOX_BATCH_SIZE, "analyzed": analyze, "stopped": stopped}


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
