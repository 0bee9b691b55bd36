"""The chaos soak (`make chaos`): place orders in both flows while workers, Redis, PostgreSQL and
the broker are killed and restarted, wait until everything settled, then check the invariants.

    python -m perf.chaos [--orders N] [--broker redis|rabbitmq] [--short] [--seed S]

It never touches the services you run: it starts a private PostgreSQL cluster and Redis server
(perf.services) and, with --broker rabbitmq, a private vhost on the machine's RabbitMQ
(CHAOS_RABBITMQ_URL, default amqp://guest:guest@127.0.0.1:5672//), with two `celery worker`s and
a `celery beat` on top. Faults, spread over the placing phase: a random pool child kill -9'd every
few seconds, one whole worker kill -9'd and restarted, Redis crashed the way a machine crash
leaves it with its append-only file on (appendfsync everysec, as docker-compose.yml runs it):
kill -9'd, its AOF cut back to where it was a second earlier, started again, so that the last
second's queued messages and stream entries are lost and the relay must put the entries back;
PostgreSQL restarted (every connection cut), a second beat for a while, and with RabbitMQ every
connection to our vhost forced closed once.

Writes docs/chaos/latest-<broker>.md and .json (--short: var/chaos/short-<broker>.*) and exits 1
on any violation.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from perf.common import REPO, machine_description, machine_markdown, write_report
from perf.services import PrivatePostgres, PrivateRedis, RabbitVhost

REPORT_DIR = REPO / "docs" / "chaos"  # the full runs' reports, kept with the code they measured
SHORT_REPORT_DIR = REPO / "var" / "chaos"  # the short (CI) runs': not committed
DEFAULT_RABBITMQ = "amqp://guest:guest@127.0.0.1:5672//"
log = logging.getLogger("perf.chaos")


@dataclass(frozen=True)
class Plan:
    orders: int
    window: float  # seconds over which orders are placed and faults injected
    child_kill_every: float
    settle_timeout: float  # bound on the wait for quiescence after the last order is placed
    workers: int = 2
    concurrency: int = 2


FULL = Plan(orders=2000, window=150.0, child_kill_every=4.0, settle_timeout=420.0)
# About two minutes in all; every kind of fault at least once (a child kill every 10 s).
SHORT = Plan(orders=300, window=40.0, child_kill_every=10.0, settle_timeout=180.0)


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the placing phase starts
    kind: str


def fault_schedule(plan: Plan, *, broker: str, rng: random.Random) -> list[Fault]:
    """When each fault strikes. One of each big fault at its own share of the window (so their
    recoveries do not overlap), child kills every `child_kill_every` seconds until a little after
    the last order, each with some jitter."""
    w = plan.window
    faults = [
        Fault(0.15 * w, "beat2_start"),
        Fault(0.25 * w, "worker_kill"),
        Fault(0.25 * w + 3.0, "worker_restart"),
        Fault(0.45 * w, "redis_restart"),
        Fault(0.55 * w, "beat2_stop"),
        Fault(0.65 * w, "postgres_restart"),
    ]
    if broker == "rabbitmq":
        faults.append(Fault(0.8 * w, "broker_connections_close"))
    t = plan.child_kill_every / 2
    while t < 1.1 * w:
        faults.append(Fault(t + rng.uniform(-0.2, 0.2) * plan.child_kill_every, "child_kill"))
        t += plan.child_kill_every
    return sorted(faults, key=lambda f: f.at)


# --- the environment the soak, its workers and its beats share ---------------------------------


def soak_environment(*, pg: PrivatePostgres, redis: PrivateRedis, broker_url: str, root: Path, queue: str) -> dict[str, str]:
    return {
        "DJANGO_SETTINGS_MODULE": "config.settings.production",
        "SECRET_KEY": secrets.token_urlsafe(50),
        "DATABASE_URL": pg.url,
        "CELERY_BROKER_URL": broker_url,
        "REDIS_URL": redis.url(1),
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "CHAINSAGA_VAR_DIR": str(root / "var"),
        "PAYMENTS_PROVIDER_PATH": str(root / "var" / "payment-provider.sqlite3"),
        # Both publishers: Redis streams for outside consumers, consumer tasks for the choreography.
        "OUTBOX_PUBLISHER": "redis,consumers",
        # Recovery in seconds rather than minutes, so the bounded wait for quiescence is short: the
        # sweeper looks every 3 s and re-drives a saga 3 s after its step timeout passed; a
        # consumer delivery that was lost is sent again after 20 s (checked every 10 s).
        "SAGAS_SWEEP_INTERVAL": "3",
        "SAGAS_STUCK_GRACE": "3",
        "CONSUMER_REDELIVER_AFTER": "20",
        "CONSUMER_REDELIVER_INTERVAL": "10",
        # With Redis as broker, a message taken by a worker that is killed whole comes back only
        # after the visibility timeout. It must exceed every step's timeout + hard-limit grace +
        # largest retry delay (30 + 5 + 60 = 95 s for place_order's default-policy steps; the
        # engine refuses a definition that breaks this), or a slow step would be delivered twice
        # while it runs. 120 s is the smallest round figure above that; the sweeper usually
        # re-drives such a saga sooner (30 s step timeout + 3 s grace).
        "SAGAS_VISIBILITY_TIMEOUT": "120",
        "SAGAS_FAULT_INJECTION": "false",
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }


def prepare_database(plan: Plan) -> tuple[object, dict[str, int]]:
    """Migrate, seed the demo catalogue and customer. Stock is about what the confirmed orders need,
    so the last orders run out of stock (the STOCK_UNAVAILABLE paths get exercised too)."""
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from inventory.models import Stock

    call_command("migrate", verbosity=0, interactive=False)
    # force: production settings refuse demo users, and this deployment is thrown away afterwards.
    call_command("seed_demo", stock=max(50, plan.orders // 2), force=True, stdout=open(os.devnull, "w"))
    initial = dict(Stock.objects.values_list("product__sku", "on_hand"))
    return get_user_model().objects.get(username="demo"), initial


# --- the cluster: workers and beats --------------------------------------------------------------


class Cluster:
    """The soak's celery workers and beats, and the faults that strike them."""

    def __init__(self, plan: Plan, env: dict[str, str]):
        from sagas.testing import CeleryBeat, CeleryWorker

        self.env = env
        self.workers = [CeleryWorker(concurrency=plan.concurrency, env=env) for _ in range(plan.workers)]
        self.beat = CeleryBeat(env=env)
        self.beat2 = CeleryBeat(env=env)

    def start(self) -> Cluster:
        for worker in self.workers:
            worker.start()
        self.beat.start()
        return self

    def stop(self) -> None:
        for process in (self.beat2, self.beat, *self.workers):
            process.stop(timeout=20)

    def kill_random_child(self, rng: random.Random) -> str:
        candidates = [(n, pid) for n, w in enumerate(self.workers) if w.alive for pid in w.children()]
        if not candidates:
            return "no pool child alive"
        n, pid = rng.choice(candidates)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return f"worker {n} child {pid} had exited already"
        return f"worker {n} child {pid}"

    def dead(self) -> list[str]:
        """The workers and the first beat that are not running (the second beat stops on schedule)."""
        processes = [(f"worker {n}", w) for n, w in enumerate(self.workers)] + [("beat", self.beat)]
        return [f"{name} exited with {p.process.returncode}" for name, p in processes if not p.alive]

    def logs(self) -> list[Path]:
        return [p.log_path for p in (*self.workers, self.beat, self.beat2)]

    def remove_beat_schedules(self) -> None:
        for beat in (self.beat, self.beat2):
            schedule = Path(next(a for a in beat.args if a.startswith("--schedule=")).split("=", 1)[1])
            shutil.rmtree(schedule.parent, ignore_errors=True)


# --- faults ---------------------------------------------------------------------------------------


@dataclass
class Timeline:
    t0: float = field(default_factory=time.monotonic)
    entries: list[dict] = field(default_factory=list)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def record(self, at: float, kind: str, detail: str, *, took: float, ok: bool = True) -> None:
        self.entries.append({"t_s": at, "fault": kind, "took_s": round(took, 2), "ok": ok, "detail": detail})


class FaultInjector(threading.Thread):
    """Runs the fault schedule against the cluster and the services, recording each fault."""

    def __init__(self, schedule: list[Fault], actions: dict[str, Callable[[], str]], timeline: Timeline):
        super().__init__(name="chaos-faults", daemon=True)
        self.schedule, self.actions, self.timeline = schedule, actions, timeline
        self.stopping = threading.Event()

    def run(self) -> None:
        for fault in self.schedule:
            if self.stopping.wait(max(0.0, fault.at - (time.monotonic() - self.timeline.t0))):
                return
            started, at = time.monotonic(), self.timeline.now()
            try:
                detail, ok = self.actions[fault.kind](), True
            except Exception as exc:  # noqa: BLE001 - the fault harness's boundary: recorded as a failed fault
                detail, ok = f"{type(exc).__name__}: {exc}", False
            self.timeline.record(at, fault.kind, detail, took=time.monotonic() - started, ok=ok)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=120)


def fault_actions(cluster: Cluster, pg: PrivatePostgres, redis: PrivateRedis, vhost: RabbitVhost | None,
                  rng: random.Random) -> dict[str, Callable[[], str]]:
    def worker_kill() -> str:
        cluster.workers[0].kill()
        return "kill -9 of worker 0's process group (main process and pool children)"

    def worker_restart() -> str:
        cluster.workers[0].start()
        return "worker 0 started again"

    def redis_restart() -> str:
        # A machine crash with appendfsync everysec: the last second of writes never reached the
        # disk. Queued messages and stream entries of that second are lost; the sweeper, the
        # consumer redelivery and the relay's stream check must make up for them.
        on_disk = redis.aof_mark()
        time.sleep(1.0)
        redis.crash_restart(down_for=2.0, back_to=on_disk)
        return (f"kill -9 with the AOF cut back to where it was 1 s earlier ({on_disk.size} bytes), down 2 s, "
                f"started again on port {redis.port} from it")

    def postgres_restart() -> str:
        pg.restart()
        return f"pg_ctl restart -m fast on port {pg.port}"

    def broker_connections_close() -> str:
        return vhost.close_connections() or "closed"

    def beat2_start() -> str:
        cluster.beat2.start()
        return "a second celery beat started"

    def beat2_stop() -> str:
        cluster.beat2.stop()
        return "the second celery beat stopped"

    return {
        "child_kill": lambda: cluster.kill_random_child(rng),
        "worker_kill": worker_kill,
        "worker_restart": worker_restart,
        "redis_restart": redis_restart,
        "postgres_restart": postgres_restart,
        "broker_connections_close": broker_connections_close,
        "beat2_start": beat2_start,
        "beat2_stop": beat2_stop,
    }


# --- the client placing orders -------------------------------------------------------------------


@dataclass
class Request:
    key: str
    lines: list
    payment_method: str
    flow: str
    tries: int = 0
    first_try: float = 0.0
    due: float = 0.0


def order_requests(count: int, *, skus: list[str], rng: random.Random, run: str) -> list[Request]:
    """The orders to place: both flows interleaved, place_orders' default payment-method mix."""
    from orders.management.commands.place_orders import DEFAULT_MIX, parse_mix
    from orders.models import Flow
    from orders.services import LineRequest

    methods, weights = zip(*parse_mix(DEFAULT_MIX).items())
    flows = (Flow.ORCHESTRATED, Flow.CHOREOGRAPHED)
    return [
        Request(
            key=f"chaos-{run}-{n}",
            lines=[LineRequest(sku, rng.randint(1, 3)) for sku in rng.sample(skus, rng.randint(1, min(3, len(skus))))],
            payment_method=rng.choices(methods, weights)[0],
            flow=flows[n % 2],
        )
        for n in range(count)
    ]


class Client:
    """Places orders the way a careful client does: each under its idempotency key; when the
    request fails (database restarting, broker down, the key still in flight) the same request
    is retried later with backoff, while the next orders go on."""

    GIVE_UP_AFTER = 240.0

    def __init__(self, owner):
        self.owner = owner
        self.placed: dict[str, object] = {}  # key -> order id
        self.waiting: list[Request] = []
        self.errors: Counter[str] = Counter()
        self.given_up: list[str] = []

    def place(self, request: Request, now: float) -> None:
        from django.db import connection

        from orders.services import order_place

        request.tries += 1
        request.first_try = request.first_try or now
        try:
            result = order_place(owner=self.owner, lines=request.lines, payment_method=request.payment_method,
                                 flow=request.flow, idempotency_key=request.key)
        except Exception as exc:  # noqa: BLE001 - the client's boundary: a real client retries a 5xx/409 the same way
            self.errors[type(exc).__name__] += 1
            connection.close()  # a connection the restart cut is useless; the next try opens a new one
            if now - request.first_try > self.GIVE_UP_AFTER:
                self.given_up.append(f"{request.key}: {type(exc).__name__}: {exc}")
                return
            request.due = now + min(10.0, 0.25 * 2 ** request.tries) * random.uniform(0.5, 1.0)
            self.waiting.append(request)
            return
        self.placed[request.key] = result.order.pk

    def retry_due(self, now: float) -> bool:
        due = [r for r in self.waiting if r.due <= now]
        for request in due:
            self.waiting.remove(request)
            self.place(request, now)
        return bool(due)

    @property
    def order_ids(self) -> list:
        return list(self.placed.values())


def place_all(client: Client, requests: list[Request], plan: Plan, timeline: Timeline, bar: tqdm) -> None:
    """Place the orders evenly over the window, retrying failed ones as they come due."""
    interval = plan.window / len(requests)
    pending = list(reversed(requests))
    while pending or client.waiting:
        now = time.monotonic() - timeline.t0
        if pending and now >= (len(requests) - len(pending)) * interval:
            client.place(pending.pop(), now)
        elif not client.retry_due(now):
            time.sleep(0.02)
        bar.update(len(client.placed) - bar.n)
        bar.set_postfix(faults=len(timeline.entries), retrying=len(client.waiting), refresh=False)


def wait_for_quiet(order_ids, *, timeout: float, bar_options: dict) -> tuple[bool, dict[str, int]]:
    """Until every order settled, every saga finished, every event published and handled (twice in
    a row, a second apart); False and what is still open when `timeout` passes."""
    from perf.chaos_checks import open_work, settled_count

    deadline = time.monotonic() + timeout
    quiet_polls = 0
    with tqdm(total=len(order_ids), desc="settling", unit="order", **bar_options) as bar:
        while True:
            bar.update(settled_count(order_ids) - bar.n)
            work = open_work(order_ids)
            bar.set_postfix({k.split()[-1]: v for k, v in work.items()}, refresh=False)
            quiet_polls = quiet_polls + 1 if not any(work.values()) else 0
            if quiet_polls >= 2:
                return True, work
            if time.monotonic() > deadline:
                return False, work
            time.sleep(1.0)


# --- the report ------------------------------------------------------------------------------------


def command_line(args: argparse.Namespace) -> str:
    parts = ["python -m perf.chaos"]
    if args.short:
        parts.append("--short")
    if args.orders is not None:
        parts.append(f"--orders {args.orders}")
    parts.append(f"--broker {args.broker}")
    if args.seed is not None:
        parts.append(f"--seed {args.seed}")
    return " ".join(parts)


def report_markdown(data: dict) -> str:
    o = data["orders"]
    lines = [
        f"# Chaos soak: {data['broker']} broker, {o['placed']} orders",
        "",
        f"**{'PASS' if data['violations'] == 0 else 'FAIL'}: {data['violations']} violations.** "
        f"`{data['command']}`, {data['wall_time_s']:.0f} s wall time (placing {data['placing_s']:.0f} s, "
        f"settling {data['settling_s']:.0f} s).",
        "",
        machine_markdown(data["machine"]),
        "",
        f"Orders: {o['placed']} placed ({', '.join(f'{k} {v}' for k, v in o['by_flow'].items())}); "
        f"{', '.join(f'{k} {v}' for k, v in o['by_status'].items())}. Sagas: "
        f"{', '.join(f'{k} {v}' for k, v in data['sagas_by_state'].items())}. "
        f"Payment methods: {', '.join(f'{k} {v}' for k, v in o['by_payment_method'].items())}.",
        f"Client retries while placing: {sum(data['client_retries'].values())} "
        f"({', '.join(f'{k} {v}' for k, v in data['client_retries'].items()) or 'none'}).",
        "",
        "## Fault timeline",
        "",
        "| t (s) | fault | took (s) | detail |",
        "| ---: | --- | ---: | --- |",
    ]
    for entry in data["faults"]:
        mark = "" if entry["ok"] else " **(failed)**"
        lines.append(f"| {entry['t_s']:.1f} | {entry['fault']}{mark} | {entry['took_s']:.1f} | {entry['detail']} |")
    lines += ["", "## Checks", "", "| check | checked | violations |", "| --- | ---: | ---: |"]
    lines += [f"| {c['name']} | {c['checked']} | {c['violations']} |" for c in data["checks"]]
    lines += ["", "## Recovery (what the faults cost, and what absorbed them)", "", "| what | count |", "| --- | ---: |"]
    lines += [f"| {k} | {v} |" for k, v in data["recovery"].items()]
    failing = [c for c in data["checks"] if c["violations"]]
    if failing or data["open_work"]:
        lines += ["", "## Violations", ""]
        if data["open_work"]:
            lines.append(f"Still open when the wait for quiescence ended: {data['open_work']}")
        for check in failing:
            lines += [f"- {check['name']}:"] + [f"  - {example}" for example in check["examples"]]
    return "\n".join(lines)


def summary_rows(data: dict) -> str:
    width = max(len(c["name"]) for c in data["checks"])
    rows = [f"{'check':<{width}}  {'checked':>8}  {'violations':>10}"]
    rows += [f"{c['name']:<{width}}  {c['checked']:>8}  {c['violations']:>10}" for c in data["checks"]]
    return "\n".join(rows)


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=None, help=f"orders to place (default {FULL.orders}; --short {SHORT.orders})")
    parser.add_argument("--broker", choices=("redis", "rabbitmq"), default="redis")
    parser.add_argument("--short", action="store_true", help="the CI version: a few hundred orders, about two minutes")
    parser.add_argument("--seed", type=int, default=None, help="random seed for the orders and the fault jitter")
    parser.add_argument("--report-dir", type=Path, default=None, help=f"default {REPORT_DIR.relative_to(REPO)}/, with --short {SHORT_REPORT_DIR.relative_to(REPO)}/")
    args = parser.parse_args(argv)
    if args.report_dir is None:
        args.report_dir = SHORT_REPORT_DIR if args.short else REPORT_DIR
    if args.orders is not None and args.orders < 10:
        parser.error("--orders must be at least 10")
    return args


def plan_for(args: argparse.Namespace) -> Plan:
    base = SHORT if args.short else FULL
    if args.orders is None:
        return base
    # Keep the placing rate of the base plan; the window (and so the faults) scales with the orders.
    rate = base.orders / base.window
    return Plan(orders=args.orders, window=max(20.0, args.orders / rate), child_kill_every=base.child_kill_every,
                settle_timeout=base.settle_timeout)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = plan_for(args)
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    rng = random.Random(seed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up on `kill` too
    bar_options = {"disable": False, "mininterval": 0.5 if sys.stderr.isatty() else 10.0, "file": sys.stderr}
    started = time.monotonic()
    with ExitStack() as stack:
        root = Path(tempfile.mkdtemp(prefix="chainsaga-chaos-"))
        stack.callback(shutil.rmtree, root, ignore_errors=True)
        print(f"chaos soak: {plan.orders} orders, {args.broker} broker, seed {seed}; private services under {root}", flush=True)
        pg = stack.enter_context(PrivatePostgres(root))
        redis = stack.enter_context(PrivateRedis(root, appendfsync="everysec"))  # as docker-compose.yml runs it
        vhost, broker_url = None, redis.url(0)
        if args.broker == "rabbitmq":
            vhost = stack.enter_context(RabbitVhost(os.environ.get("CHAOS_RABBITMQ_URL", DEFAULT_RABBITMQ)))
            broker_url = vhost.url
        queue = f"chainsaga-chaos-{secrets.token_hex(4)}"
        os.environ.update(soak_environment(pg=pg, redis=redis, broker_url=broker_url, root=root, queue=queue))

        import django

        django.setup()
        _log_to(root / "soak.log")
        from django.db import connections

        stack.callback(connections.close_all)
        if vhost is not None and not vhost.private:
            stack.callback(_delete_queue, queue)
        owner, initial_on_hand = prepare_database(plan)

        from sagas.testing import subprocess_environment

        cluster = Cluster(plan, subprocess_environment())
        outcome: dict = {}
        logs = [*cluster.logs(), root / "soak.log", pg.log, root / "redis.log"]
        stack.callback(_keep_logs_on_failure, logs, args, outcome)
        stack.callback(cluster.remove_beat_schedules)
        stack.callback(cluster.stop)
        cluster.start()

        outcome.update(soak(Run(args, plan, seed, rng, cluster, pg, redis, vhost, owner, initial_on_hand, bar_options, started)))
    print(summary_rows(outcome["data"]))
    print(f"report: {outcome['paths'][1]} and {outcome['paths'][0].name}")
    violations = outcome["data"]["violations"]
    print(f"{'PASS' if violations == 0 else 'FAIL'}: {violations} violations in {time.monotonic() - started:.0f} s")
    return 0 if violations == 0 else 1


@dataclass
class Run:
    """One soak: what was asked, the services and cluster it runs on, and what it gathered."""

    args: argparse.Namespace
    plan: Plan
    seed: int
    rng: random.Random
    cluster: Cluster
    pg: PrivatePostgres
    redis: PrivateRedis
    vhost: RabbitVhost | None
    owner: object
    initial_on_hand: dict[str, int]
    bar_options: dict
    started: float = field(default_factory=time.monotonic)
    timeline: Timeline = field(default_factory=Timeline)
    client: Client | None = None
    unexpected_exits: list[str] = field(default_factory=list)


def soak(run: Run) -> dict:
    """Place the orders under faults, wait for quiescence, stop the cluster, check, report."""
    placing_s = place_under_faults(run)
    settle_started = time.monotonic()
    quiet, work = wait_for_quiet(run.client.order_ids, timeout=run.plan.settle_timeout, bar_options=run.bar_options)
    settling_s = time.monotonic() - settle_started
    run.unexpected_exits = run.cluster.dead()  # before stopping: a process that died on its own
    run.cluster.stop()  # a still snapshot to check
    data = report_data(run, quiet=quiet, work=work, placing_s=placing_s, settling_s=settling_s)
    stem = f"{'short' if run.args.short else 'latest'}-{run.args.broker}"
    return {"data": data, "paths": write_report(run.args.report_dir, stem, data, report_markdown(data))}


def place_under_faults(run: Run) -> float:
    """Place every order while the fault schedule runs; returns how long placing took."""
    from inventory.models import Product

    skus = list(Product.objects.values_list("sku", flat=True))
    requests = order_requests(run.plan.orders, skus=skus, rng=run.rng, run=secrets.token_hex(4))
    actions = fault_actions(run.cluster, run.pg, run.redis, run.vhost, run.rng)
    injector = FaultInjector(fault_schedule(run.plan, broker=run.args.broker, rng=run.rng), actions, run.timeline)
    run.client = Client(run.owner)
    run.timeline.t0 = time.monotonic()
    injector.start()
    try:
        with tqdm(total=run.plan.orders, desc="placing", unit="order", **run.bar_options) as bar:
            place_all(run.client, requests, run.plan, run.timeline, bar)
        placing_s = time.monotonic() - run.timeline.t0
        injector.join(timeout=max(0.0, 1.1 * run.plan.window - placing_s + 60))  # the last child kills
    finally:
        injector.stop()
    return placing_s


def harness_checks(run: Run, *, quiet: bool, work: dict) -> list[dict]:
    """The soak's own conditions: every order placed, every fault injected, quiet in time."""
    failed = [e for e in run.timeline.entries if not e["ok"]]
    placed = len(run.client.order_ids)
    return [
        {"name": "every order placed (client retries bounded)", "checked": run.plan.orders,
         "violations": run.plan.orders - placed, "examples": run.client.given_up[:20]},
        {"name": "every fault injected as scheduled", "checked": len(run.timeline.entries),
         "violations": len(failed), "examples": [f"{e['fault']} at {e['t_s']} s: {e['detail']}" for e in failed]},
        {"name": "no worker or beat died except when killed on schedule", "checked": len(run.cluster.workers) + 1,
         "violations": len(run.unexpected_exits), "examples": run.unexpected_exits},
        {"name": "quiescence reached within the bound", "checked": 1, "violations": 0 if quiet else 1,
         "examples": [] if quiet else [f"still open after {run.plan.settle_timeout:.0f} s: {work}"]},
    ]


def report_data(run: Run, *, quiet: bool, work: dict, placing_s: float, settling_s: float) -> dict:
    from orders.models import Order
    from perf.chaos_checks import recovery_counts, run_checks
    from sagas.models import SagaInstance

    order_ids = run.client.order_ids
    checks = harness_checks(run, quiet=quiet, work=work) + [
        c.as_dict() for c in run_checks(order_ids, initial_on_hand=run.initial_on_hand)
    ]
    orders = Order.objects.filter(pk__in=order_ids)

    def tally(queryset, field_name: str) -> dict:
        return dict(sorted(Counter(queryset.values_list(field_name, flat=True)).items()))

    return {
        "command": command_line(run.args),
        "broker": run.args.broker,
        "seed": run.seed,
        "plan": asdict(run.plan),
        "machine": machine_description(),
        "wall_time_s": round(time.monotonic() - run.started, 1),
        "placing_s": round(placing_s, 1),
        "settling_s": round(settling_s, 1),
        "orders": {
            "placed": len(order_ids),
            "by_flow": tally(orders, "flow"),
            "by_status": tally(orders, "status"),
            "by_payment_method": tally(orders, "payment_method"),
        },
        "sagas_by_state": tally(SagaInstance.objects.filter(order__in=orders), "state"),
        "client_retries": dict(run.client.errors),
        "faults": run.timeline.entries,
        "checks": checks,
        "recovery": recovery_counts(order_ids),
        "open_work": {} if quiet else work,
        "violations": sum(c["violations"] for c in checks),
    }


def _log_to(path: Path) -> None:
    """This process's log goes to a file: the errors it logs while Redis or PostgreSQL are down
    (a relay kick that could not be sent) are expected, and would bury the progress bars."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    logging.getLogger("sagas").setLevel(logging.WARNING)  # one line per saga transition is noise here


def _delete_queue(queue: str) -> None:
    from config.celery import app

    with app.connection_for_write() as conn:
        conn.default_channel.queue_delete(queue)


def _keep_logs_on_failure(logs: list[Path], args, outcome: dict) -> None:
    """The workers', beats' and services' logs are kept under var/chaos/ when the soak failed (or
    broke), deleted otherwise."""
    failed = outcome.get("data", {}).get("violations", 1) > 0
    keep = REPO / "var" / "chaos" / f"{'short' if args.short else 'latest'}-{args.broker}-logs"
    if failed:
        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir(parents=True)
    for path in logs:
        if failed and path.exists():
            shutil.copy(path, keep / path.name)
        if path.name.startswith("chainsaga-"):  # the celery logs live in /tmp; the others go with the run's directory
            path.unlink(missing_ok=True)
    if failed:
        print(f"worker and beat logs kept in {keep}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
