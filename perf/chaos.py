"""The chaos soak (`make chaos`): place orders in both flows while workers, Redis, PostgreSQL and
the broker are killed, frozen and restarted, poison and forged messages arrive, a new saga version
is deployed and an operator steps in; wait until everything settled, then check the invariants.

    python -m perf.chaos [--orders N] [--broker redis|rabbitmq] [--short] [--seed S]

It never touches the services you run: it starts a private PostgreSQL cluster and Redis server
(perf.services) and, with --broker rabbitmq, a private vhost on the machine's RabbitMQ
(CHAOS_RABBITMQ_URL, default amqp://guest:guest@127.0.0.1:5672//), with two step `celery worker`s,
a control worker (the sweeper's queue), a `celery beat` and gunicorn on top, all with the
production settings. Faults, spread over the placing phase:
  - processes: a random pool child kill -9'd every few seconds; one whole worker kill -9'd and
    restarted; a worker SIGSTOPped while one of its pool children holds row locks, for longer than
    a step's lock timeout, then SIGCONT; a second beat for a while;
  - services: Redis crashed the way a machine crash leaves it with its append-only file on
    (appendfsync everysec, as docker-compose.yml runs it: kill -9'd, its AOF cut back to where it
    was a second earlier, started again, so the last second's queued messages and stream entries
    are lost and the relay must put the entries back); PostgreSQL stopped (every connection cut)
    and started again; PostgreSQL and Redis each frozen (SIGSTOP) for a few seconds; with RabbitMQ
    every connection to our vhost forced closed once;
  - messages: garbage and wrong-shape messages pushed into the task and control queues
    (sagas.testing.poison); forged out-of-order step and compensation messages for running sagas;
  - a deploy: every worker restarted, one by one, with place_order v2 registered beside v1
    (perf.chaos_deploy), the web tier redeployed blue/green, and the orders placed after it start on v2;
  - the operator: running sagas aborted and FAILED ones retried through the staff API;
  - customers: a share of the orders placed through the API, which is called throughout (health,
    order lists), outages included; pm_blackhole (the provider charges, every response is lost)
    in both flows.

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
from dataclasses import asdict, dataclass, field, replace
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
    workers: int = 2  # step workers; a control worker serves the sweeper's queue besides them
    concurrency: int = 2
    # A worker holding row locks stays frozen this long: longer than a step's lock timeout (at most
    # SAGAS_STEP_LOCK_TIMEOUT_MAX, 10 s), shorter than its idle-in-transaction timeout (35 s).
    worker_freeze: float = 20.0
    service_freeze: float = 5.0  # PostgreSQL and Redis each stay frozen this long
    api_share: int = 5  # every n-th order is placed through the web tier's API
    forged_sagas: int = 5  # running sagas sent forged messages, per round (two rounds)
    aborts: int = 5  # running sagas the operator aborts, per round (two rounds)


FULL = Plan(orders=2000, window=150.0, child_kill_every=4.0, settle_timeout=420.0)
# About two and a half minutes in all; every kind of fault at least once (a child kill every 10 s).
SHORT = Plan(orders=300, window=90.0, child_kill_every=10.0, settle_timeout=180.0, worker_freeze=15.0,
             service_freeze=4.0, forged_sagas=3, aborts=3)


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the placing phase starts
    kind: str


def fault_schedule(plan: Plan, *, broker: str, rng: random.Random) -> list[Fault]:
    """When each fault strikes. Each big fault at its own share of the window, so that their
    recoveries do not overlap (the worker frozen holding locks is not cut loose early by the
    PostgreSQL restart; the deploy's restarts do not meet the freeze), child kills every
    `child_kill_every` seconds until a little after the last order, each with some jitter."""
    w = plan.window
    faults = [
        Fault(0.04 * w, "poison"),
        Fault(0.10 * w, "beat2_start"),
        Fault(0.15 * w, "forged"),
        Fault(0.20 * w, "worker_kill"),
        Fault(0.20 * w + 3.0, "worker_restart"),
        Fault(0.28 * w, "deploy_v2"),
        Fault(0.44 * w, "redis_restart"),
        Fault(0.50 * w, "beat2_stop"),
        Fault(0.53 * w, "worker_freeze"),  # SIGCONT `plan.worker_freeze` seconds later, on a timer of its own
        Fault(0.60 * w, "operator"),
        Fault(0.77 * w, "postgres_restart"),
        Fault(0.80 * w, "poison"),
        Fault(0.81 * w, "forged"),
        Fault(0.84 * w, "postgres_freeze"),
        Fault(0.91 * w, "redis_freeze"),
        Fault(0.96 * w, "operator"),
    ]
    if broker == "rabbitmq":
        faults.append(Fault(0.87 * w, "broker_connections_close"))
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
        "SAGAS_CONTROL_QUEUE": f"{queue}-control",
        "CHAINSAGA_VAR_DIR": str(root / "var"),
        # The web tier (gunicorn, plain HTTP on 127.0.0.1, as docker-compose.yml runs it).
        "ALLOWED_HOSTS": "127.0.0.1",
        "SECURE_SSL_REDIRECT": "false",
        "CHAOS_DEPLOYED": str(root / "deployed"),  # exists once place_order v2 is deployed (perf.chaos_wsgi)
        # One demo customer places every order of the soak: the API's cap on one customer's
        # pending orders would refuse most of its share.
        "ORDER_MAX_PENDING_PER_CUSTOMER": "1000000",
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
        # A consumer whose handler keeps failing (pm_blackhole: every charge response lost) gives
        # up after 3 retries 1-2 s apart, parks the event and settles it (a refund by key), rather
        # than after 8 retries up to a minute apart: so the wait for quiescence stays short.
        "CONSUMER_MAX_RETRIES": "3",
        "CONSUMER_RETRY_MAX_DELAY": "2",
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
    """The soak's celery workers and beats, and the faults that strike them. As the Procfile runs
    them: step workers on the task queue, one control worker (concurrency 1) on the sweeper's."""

    def __init__(self, plan: Plan, env: dict[str, str]):
        from sagas.testing import CeleryBeat

        self.plan, self.env = plan, env
        self.include: list[str] = []  # modules every worker started from now on imports (the deploy)
        self.workers = [self._worker(control=False) for _ in range(plan.workers)]
        self.control = self._worker(control=True)
        self.beat = CeleryBeat(env=env)
        self.beat2 = CeleryBeat(env=env)
        self.frozen: int | None = None  # the step worker stopped with SIGSTOP right now
        self.retired: list = []  # workers replaced by a restart (their logs are kept)
        self.deployed: list = []  # workers started with the deploy's modules

    def _worker(self, *, control: bool):
        from sagas.testing import CeleryWorker

        queue = self.env["SAGAS_CONTROL_QUEUE"] if control else self.env["CELERY_TASK_DEFAULT_QUEUE"]
        worker = CeleryWorker(queues=[queue], concurrency=1 if control else self.plan.concurrency, env=self.env,
                              include=list(self.include) or None)
        if self.include:
            self.deployed.append(worker)
        return worker

    @property
    def all_workers(self) -> list:
        return [*self.workers, self.control]

    def start(self) -> Cluster:
        for worker in self.all_workers:
            worker.start()
        self.beat.start()
        return self

    def stop(self) -> None:
        self.thaw()
        for process in (self.beat2, self.beat, *self.all_workers):
            process.stop(timeout=20)

    def restart_worker(self, n: int) -> None:
        """A new process for step worker `n` (dead, or warm-stopped here), with today's includes."""
        self.workers[n].stop(timeout=30)
        self.retired.append(self.workers[n])
        self.workers[n] = self._worker(control=False).start()

    def deploy(self, module: str) -> None:
        """Every worker warm-stopped and started again, one at a time, importing `module` too."""
        self.include.append(module)
        for n in range(len(self.workers)):
            self.restart_worker(n)
        self.control.stop(timeout=30)
        self.retired.append(self.control)
        self.control = self._worker(control=True).start()

    def thaw(self) -> None:
        if self.frozen is not None:
            os.killpg(self.workers[self.frozen].process.pid, signal.SIGCONT)
            self.frozen = None

    def kill_random_child(self, rng: random.Random) -> str:
        workers = [(f"worker {n}", w) for n, w in enumerate(self.workers) if n != self.frozen] + [("control worker", self.control)]
        candidates = [(name, pid) for name, w in workers if w.alive for pid in w.children()]
        if not candidates:
            return "no pool child alive"
        name, pid = rng.choice(candidates)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return f"{name} child {pid} had exited already"
        return f"{name} child {pid}"

    def dead(self) -> list[str]:
        """The workers and the first beat that are not running (the second beat stops on schedule)."""
        processes = [(f"worker {n}", w) for n, w in enumerate(self.workers)] + [("control worker", self.control), ("beat", self.beat)]
        return [f"{name} exited with {p.process.returncode}" for name, p in processes if not p.alive]

    def logs(self) -> list[Path]:
        return [p.log_path for p in (*self.retired, *self.all_workers, self.beat, self.beat2)]

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
        from django.db import connection

        for fault in self.schedule:
            if self.stopping.wait(max(0.0, fault.at - (time.monotonic() - self.timeline.t0))):
                return
            started, at = time.monotonic(), self.timeline.now()
            try:
                detail, ok = self.actions[fault.kind](), True
            except Exception as exc:  # noqa: BLE001 - the fault harness's boundary: recorded as a failed fault
                detail, ok = f"{type(exc).__name__}: {exc}", False
            finally:
                connection.close()  # the next fault may come after a PostgreSQL restart: a new connection then
            self.timeline.record(at, fault.kind, detail, took=time.monotonic() - started, ok=ok)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=120)


DEPLOY_MODULE = "perf.chaos_deploy"  # place_order v2, deployed mid-run


@dataclass
class Ledger:
    """What the faults did, for the checks: messages sent, sagas acted on, outages as the clock saw
    them (seconds after the placing phase started)."""

    poison: list[str] = field(default_factory=list)  # tokens of the poison messages sent
    forged: list[tuple[str, str, str]] = field(default_factory=list)  # (saga id, step, direction)
    v1_in_flight_at_deploy: list = field(default_factory=list)  # saga ids
    outages: list[tuple[str, float, float]] = field(default_factory=list)  # (fault, start, end)
    frozen: list[dict] = field(default_factory=list)  # {"worker", "log", "offset", "frozen_s"} per freeze
    aborts: list[tuple[str, int | None]] = field(default_factory=list)  # (saga id, answer status)
    retries: list[tuple[str, int | None]] = field(default_factory=list)
    timers: list[threading.Thread] = field(default_factory=list)  # the thaw and the operator's requests, running


def fault_actions(run: Run) -> dict[str, Callable[[], str]]:
    from perf.chaos_faults import forge_step_messages, freeze_a_worker_holding_locks, freeze_for, running_sagas
    from sagas.models import ACTIVE_STATES, SagaInstance, SagaState
    from sagas.testing.poison import send_poison

    cluster, pg, redis, vhost, rng, ledger, timeline = run.cluster, run.pg, run.redis, run.vhost, run.rng, run.ledger, run.timeline
    poison_rounds = iter(range(1, 100))

    def outage(kind: str, action: Callable[[], None]) -> None:
        start = timeline.now()
        action()
        ledger.outages.append((kind, start, timeline.now()))

    def worker_kill() -> str:
        cluster.workers[0].kill()
        return "kill -9 of worker 0's process group (main process and pool children)"

    def worker_restart() -> str:
        cluster.restart_worker(0)
        return "worker 0 started again"

    def redis_restart() -> str:
        # A machine crash with appendfsync everysec: the last second of writes never reached the
        # disk. Queued messages and stream entries of that second are lost; the sweeper, the
        # consumer redelivery and the relay's stream check must make up for them.
        on_disk = redis.aof_mark()
        time.sleep(1.0)
        outage("redis_restart", lambda: redis.crash_restart(down_for=2.0, back_to=on_disk))
        return (f"kill -9 with the AOF cut back to where it was 1 s earlier ({on_disk.size} bytes), down 2 s, "
                f"started again on port {redis.port} from it")

    def postgres_restart() -> str:
        def down_and_up() -> None:
            pg.shut_down()
            time.sleep(2.0)
            pg.start_again()

        outage("postgres_restart", down_and_up)
        return f"pg_ctl stop -m fast (every session cut), down 2 s, started again on port {pg.port}"

    def postgres_freeze() -> str:
        pids = pg.pids()
        outage("postgres_freeze", lambda: freeze_for(pids, seconds=run.plan.service_freeze))
        return f"SIGSTOP of the postmaster and its {len(pids) - 1} processes for {run.plan.service_freeze:g} s, then SIGCONT"

    def redis_freeze() -> str:
        outage("redis_freeze", lambda: freeze_for([redis.process.pid], seconds=run.plan.service_freeze))
        return f"SIGSTOP of redis-server for {run.plan.service_freeze:g} s, then SIGCONT"

    def broker_connections_close() -> str:
        return vhost.close_connections() or "closed"

    def beat2_start() -> str:
        cluster.beat2.start()
        return "a second celery beat started"

    def beat2_stop() -> str:
        cluster.beat2.stop()
        return "the second celery beat stopped"

    def poison() -> str:
        queues = [cluster.env["CELERY_TASK_DEFAULT_QUEUE"], cluster.env["SAGAS_CONTROL_QUEUE"]]
        n = next(poison_rounds)
        sent = [token for q, queue in enumerate(queues) for token in send_poison(run.broker_url, queue, marker=f"{run.name}-p{n}{q}")]
        ledger.poison += sent
        return f"{len(sent)} garbage and wrong-shape messages into the task queue and the control queue"

    def forged() -> str:
        sent = forge_step_messages(running_sagas(limit=run.plan.forged_sagas, rng=rng))
        if not sent:
            raise RuntimeError("no running saga with steps to go to forge messages for")
        ledger.forged += sent
        return f"{len(sent)} forged sagas.run_step messages (the last step out of order, a compensation of a step not done) for {len({s for s, *_ in sent})} running sagas"

    def deploy_v2() -> str:
        in_flight = SagaInstance.objects.filter(name="place_order", version=1, state__in=ACTIVE_STATES)
        deadline = time.monotonic() + 5
        while not in_flight.exists() and time.monotonic() < deadline:  # a deploy while sagas are in flight
            time.sleep(0.01)
        ledger.v1_in_flight_at_deploy = list(in_flight.values_list("pk", flat=True))
        started = time.monotonic()
        cluster.deploy(DEPLOY_MODULE)  # workers first
        workers_s = time.monotonic() - started
        Path(cluster.env["CHAOS_DEPLOYED"]).touch()
        web_s = run.web.redeploy()
        import perf.chaos_deploy  # noqa: F401 - from now on this process, too, starts orders on v2

        return (f"every worker restarted one by one with place_order v2 registered beside v1 "
                f"({len(ledger.v1_in_flight_at_deploy)} v1 sagas in flight; {workers_s:.1f} s), then the web tier "
                f"blue/green (a new gunicorn, clients switched to it once it answered after {web_s:.1f} s, the old one "
                "stopped gracefully); new orders start on v2")

    def worker_freeze() -> str:
        n, holding = freeze_a_worker_holding_locks(cluster.workers, pg_port=pg.port, prefer="sagas_sagainstance", within=6.0)
        cluster.frozen = n
        entry = {"worker": f"worker {n}", "log": str(cluster.workers[n].log_path)}
        ledger.frozen.append(entry)
        since = time.monotonic()

        def thaw() -> None:  # on time, whatever the fault schedule is busy with meanwhile
            at = timeline.now()
            cluster.thaw()
            entry["frozen_s"] = round(time.monotonic() - since, 1)
            entry["offset"] = Path(entry["log"]).stat().st_size
            timeline.record(at, "worker_thaw", f"SIGCONT of worker {n} after {entry['frozen_s']:.1f} s", took=0.0)

        ledger.timers.append(threading.Timer(run.plan.worker_freeze, thaw))
        ledger.timers[-1].start()
        return f"SIGSTOP of worker {n}'s process group while its {holding}; SIGCONT in {run.plan.worker_freeze:g} s"

    def operator() -> str:
        # The requests go out from a thread of their own: an abort may wait for a saga lock that a
        # frozen worker holds (a 503 after up to 5 s, tried again), and the next faults must not wait.
        sagas = [str(saga.id) for saga in running_sagas(limit=run.plan.aborts, rng=rng)]
        failed = [str(pk) for pk in SagaInstance.objects.filter(state=SagaState.FAILED).values_list("pk", flat=True)]

        def act() -> None:
            ledger.aborts.extend((saga_id, run.api.saga_action(saga_id, "abort")) for saga_id in sagas)
            ledger.retries.extend((saga_id, run.api.saga_action(saga_id, "retry")) for saga_id in failed)

        ledger.timers.append(threading.Thread(target=act, name="chaos-operator"))
        ledger.timers[-1].start()
        return (f"staff API: abort of {len(sagas)} running sagas and retry of {len(failed)} FAILED sagas "
                "(answers under Operator above)")

    return {
        "child_kill": lambda: cluster.kill_random_child(rng),
        "worker_kill": worker_kill,
        "worker_restart": worker_restart,
        "redis_restart": redis_restart,
        "postgres_restart": postgres_restart,
        "postgres_freeze": postgres_freeze,
        "redis_freeze": redis_freeze,
        "broker_connections_close": broker_connections_close,
        "beat2_start": beat2_start,
        "beat2_stop": beat2_stop,
        "poison": poison,
        "forged": forged,
        "deploy_v2": deploy_v2,
        "worker_freeze": worker_freeze,
        "operator": operator,
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


# place_orders' default payment-method mix, and pm_blackhole (charged, every response lost).
BLACKHOLE = "pm_blackhole"
MIX = "ok=70,declined=10,insufficient_funds=5,flaky=10,timeout=5,blackhole=3"


def order_requests(count: int, *, skus: list[str], rng: random.Random, run: str) -> list[Request]:
    """The orders to place: both flows interleaved, payment methods drawn from MIX, and at least
    one pm_blackhole order in each flow."""
    from orders.management.commands.place_orders import parse_mix
    from orders.models import Flow
    from orders.services import LineRequest

    methods, weights = zip(*parse_mix(MIX).items())
    flows = (Flow.ORCHESTRATED, Flow.CHOREOGRAPHED)
    requests = [
        Request(
            key=f"chaos-{run}-{n}",
            lines=[LineRequest(sku, rng.randint(1, 3)) for sku in rng.sample(skus, rng.randint(1, min(3, len(skus))))],
            payment_method=rng.choices(methods, weights)[0],
            flow=flows[n % 2],
        )
        for n in range(count)
    ]
    for flow in flows:
        if not any(r.flow == flow and r.payment_method == BLACKHOLE for r in requests):
            rng.choice([r for r in requests if r.flow == flow]).payment_method = BLACKHOLE
    return requests


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


def place_all(client: Client, api, requests: list[Request], plan: Plan, timeline: Timeline, bar: tqdm) -> None:
    """Place the orders evenly over the window, every `plan.api_share`-th through the web tier's
    API (perf.chaos_web.ApiClient), the rest in this process; retry failed ones as they come due."""
    interval = plan.window / len(requests)
    pending = list(reversed(requests))
    while pending or client.waiting or api.placing:
        now = time.monotonic() - timeline.t0
        if pending and now >= (len(requests) - len(pending)) * interval:
            request = pending.pop()
            if (len(requests) - len(pending)) % plan.api_share == 0:
                api.place(request)
            else:
                client.place(request, now)
        elif not client.retry_due(now):
            time.sleep(0.02)
        bar.update(len(client.placed) + len(api.placed) - bar.n)
        bar.set_postfix(faults=len(timeline.entries), retrying=len(client.waiting) + api.placing, refresh=False)


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


def _counts(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "none"


def report_markdown(data: dict) -> str:
    o, w = data["orders"], data["web"]
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
        f"Web tier: {w['requests']} requests ({', '.join(f'{k} {v}' for k, v in w['by_status'].items())}), the slowest "
        f"answered in {w['slowest_s']:.1f} s; {w['orders_placed_through_the_api']} of the orders placed through the API. "
        f"Sagas by version: {', '.join(f'{k} {v}' for k, v in data['sagas_by_version'].items())}. "
        f"Operator (staff API): aborts answered {_counts(data['operator']['aborts'])}, "
        f"retries of FAILED sagas answered {_counts(data['operator']['retries'])}.",
        "",
        "## Outages as the API client saw them",
        "",
        "| outage | from (s) | to (s) | answers to requests in flight |",
        "| --- | ---: | ---: | --- |",
        *[f"| {o['fault']} | {o['from_s']:.1f} | {o['to_s']:.1f} | {_counts(o['answers'])} |" for o in data["outages"]],
        "",
        "## Fault timeline",
        "",
        "| t (s) | fault | took (s) | detail |",
        "| ---: | --- | ---: | --- |",
    ]
    for entry in data["faults"]:
        mark = "" if entry["ok"] else " **(failed)**"
        lines.append(f"| {entry['t_s']:.1f} | {entry['fault']}{mark} | {entry['took_s']:.1f} | {entry['detail']} |")
    lines += ["", "## Fault classes exercised", "", "| what | count |", "| --- | ---: |"]
    lines += [f"| {k} | {v} |" for k, v in data["exercised"].items()]
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
    return replace(base, orders=args.orders, window=max(20.0 + base.worker_freeze / 0.2, args.orders / rate))


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
        stack.callback(_resume_quietly, pg.pids)  # a freeze cut short: the cluster must stop
        redis = stack.enter_context(PrivateRedis(root, appendfsync="everysec"))  # as docker-compose.yml runs it
        stack.callback(_resume_quietly, lambda: [redis.process.pid] if redis.process else [])
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

        from perf.chaos_web import WebTier
        from sagas.testing import subprocess_environment

        env = subprocess_environment()
        cluster = Cluster(plan, env)
        web = WebTier(env, root)
        outcome: dict = {}

        def logs() -> list[Path]:  # read at the end: the deploy and the restarts add workers
            return [*cluster.logs(), root / "soak.log", pg.log, root / "redis.log", web.log]

        stack.callback(_keep_logs_on_failure, logs, args, outcome)
        stack.callback(cluster.remove_beat_schedules)
        stack.callback(cluster.stop)
        stack.callback(web.stop)
        cluster.start()
        web.start()

        run = Run(args, plan, seed, rng, cluster, web, pg, redis, vhost, broker_url, owner, initial_on_hand, bar_options, started)
        outcome.update(soak(run))
    print(summary_rows(outcome["data"]))
    print(f"report: {outcome['paths'][1]} and {outcome['paths'][0].name}")
    violations = outcome["data"]["violations"]
    data = outcome["data"]
    print(f"{'PASS' if violations == 0 else 'FAIL'}: {violations} violations; {data['orders']['placed']} orders, "
          f"{len(data['faults'])} faults, {time.monotonic() - started:.0f} s")
    return 0 if violations == 0 else 1


@dataclass
class Run:
    """One soak: what was asked, the services and cluster it runs on, and what it gathered."""

    args: argparse.Namespace
    plan: Plan
    seed: int
    rng: random.Random
    cluster: Cluster
    web: object  # perf.chaos_web.WebTier
    pg: PrivatePostgres
    redis: PrivateRedis
    vhost: RabbitVhost | None
    broker_url: str
    owner: object
    initial_on_hand: dict[str, int]
    bar_options: dict
    started: float = field(default_factory=time.monotonic)
    name: str = field(default_factory=lambda: secrets.token_hex(4))  # in the run's order keys and poison tokens
    timeline: Timeline = field(default_factory=Timeline)
    ledger: Ledger = field(default_factory=Ledger)
    client: Client | None = None
    api: object = None  # perf.chaos_web.ApiClient
    unexpected_exits: list[str] = field(default_factory=list)

    def order_ids(self) -> list:
        """The orders placed so far, in this process and through the API."""
        return [*self.client.placed.values(), *self.api.placed.values()]


def soak(run: Run) -> dict:
    """Place the orders under faults, wait for quiescence, stop the cluster, check, report."""
    placing_s = place_under_faults(run)
    settle_started = time.monotonic()
    quiet, work = wait_for_quiet(run.order_ids(), timeout=run.plan.settle_timeout, bar_options=run.bar_options)
    settling_s = time.monotonic() - settle_started
    run.unexpected_exits = run.cluster.dead() + ([] if run.web.alive else [f"the web tier exited with {run.web.process.returncode}"])
    run.web.stop()
    run.cluster.stop()  # a still snapshot to check
    data = report_data(run, quiet=quiet, work=work, placing_s=placing_s, settling_s=settling_s)
    stem = f"{'short' if run.args.short else 'latest'}-{run.args.broker}"
    return {"data": data, "paths": write_report(run.args.report_dir, stem, data, report_markdown(data))}


def place_under_faults(run: Run) -> float:
    """Place every order while the fault schedule runs and the API client calls the web tier;
    returns how long placing took."""
    from perf.chaos_web import ApiClient
    from rest_framework.authtoken.models import Token

    from inventory.models import Product

    skus = list(Product.objects.values_list("sku", flat=True))
    requests = order_requests(run.plan.orders, skus=skus, rng=run.rng, run=run.name)
    tokens = dict(Token.objects.values_list("user__username", "key"))
    actions = fault_actions(run)
    injector = FaultInjector(fault_schedule(run.plan, broker=run.args.broker, rng=run.rng), actions, run.timeline)
    run.client = Client(run.owner)
    run.timeline.t0 = time.monotonic()
    run.api = ApiClient(run.web, customer_token=tokens["demo"], staff_token=tokens["admin"], t0=run.timeline.t0).start()
    injector.start()
    try:
        with tqdm(total=run.plan.orders, desc="placing", unit="order", **run.bar_options) as bar:
            place_all(run.client, run.api, requests, run.plan, run.timeline, bar)
        placing_s = time.monotonic() - run.timeline.t0
        injector.join(timeout=max(0.0, 1.1 * run.plan.window - placing_s + 60))  # the last child kills
    finally:
        injector.stop()
        for thread in run.ledger.timers:  # the thaw, the operator's requests
            thread.join(timeout=60)
        run.api.stop()
    return placing_s


def harness_checks(run: Run, *, quiet: bool, work: dict) -> list[dict]:
    """The soak's own conditions: every order placed, every fault injected, quiet in time."""
    failed = [e for e in run.timeline.entries if not e["ok"]]
    placed = len(run.order_ids())
    return [
        {"name": "every order placed (client retries bounded)", "checked": run.plan.orders,
         "violations": run.plan.orders - placed, "examples": (run.client.given_up + run.api.given_up)[:20]},
        {"name": "every fault injected as scheduled", "checked": len(run.timeline.entries),
         "violations": len(failed), "examples": [f"{e['fault']} at {e['t_s']} s: {e['detail']}" for e in failed]},
        {"name": "no worker, beat or web server died except when killed on schedule",
         "checked": len(run.cluster.all_workers) + 2, "violations": len(run.unexpected_exits), "examples": run.unexpected_exits},
        {"name": "quiescence reached within the bound", "checked": 1, "violations": 0 if quiet else 1,
         "examples": [] if quiet else [f"still open after {run.plan.settle_timeout:.0f} s: {work}"]},
    ]


def fault_evidence(run: Run, orders, sagas) -> dict[str, int]:
    """How often each fault class happened (a class that never did proves nothing)."""
    from orders.models import Flow
    from perf.chaos_checks import sagas_in_logs
    from perf.chaos_web import WITHIN

    from django.conf import settings

    from orders.sagas import place_order

    blackhole = orders.filter(payment_method=BLACKHOLE)
    lock_timeout = max(min(step.timeout / 3, settings.SAGAS_STEP_LOCK_TIMEOUT_MAX) for step in place_order.steps)
    return {
        "poison messages sent": len(run.ledger.poison),
        "forged step messages sent": len(run.ledger.forged),
        "v1 sagas that went on on workers of the new deploy (v1 and v2 registered)": len(
            sagas_in_logs([w.log_path for w in run.cluster.deployed], name="place_order", version=1)),
        "sagas started on v2 after the deploy": sagas.filter(version=2).count(),
        f"a worker frozen holding locks for longer than the lock timeout ({lock_timeout:g} s)":
            sum(f.get("frozen_s", 0) > lock_timeout for f in run.ledger.frozen),
        "pm_blackhole orders, orchestrated": blackhole.filter(flow=Flow.ORCHESTRATED).count(),
        "pm_blackhole orders, choreographed": blackhole.filter(flow=Flow.CHOREOGRAPHED).count(),
        "sagas aborted by the operator (202)": sum(status == 202 for _, status in run.ledger.aborts),
        "orders placed through the API": len(run.api.placed),
        f"API answers within {WITHIN:g} s during an outage": sum(
            1 for a in run.api.answers for _, start, end in run.ledger.outages if a.at <= end and a.at + a.took >= start
        ),
    }


def fault_checks(run: Run, sagas, evidence: dict[str, int]) -> list[dict]:
    """The checks of what the faults of issue 9 must not break."""
    from perf.chaos_checks import abort_check, exercised_check, log_order_check, poison_check, thaw_check, versions_check
    from perf.chaos_web import web_violations

    thawed = [{"worker": f["worker"], "log_after": Path(f["log"]).read_bytes()[f["offset"]:].decode(errors="replace")}
              for f in run.ledger.frozen if "offset" in f]
    web = web_violations(run.api.answers, run.ledger.outages)
    checks = [
        exercised_check(evidence),
        poison_check(run.ledger.poison),
        log_order_check(sagas),
        versions_check(sagas),
        thaw_check(thawed),
        abort_check(run.ledger.aborts),
    ]
    return [c.as_dict() for c in checks] + [{
        "name": "web tier: every answer within 5 s, no 5xx but a JSON 503 with Retry-After, calls during every outage",
        "checked": len(run.api.answers), "violations": len(web), "examples": web[:20],
    }]


def report_data(run: Run, *, quiet: bool, work: dict, placing_s: float, settling_s: float) -> dict:
    from orders.models import Order
    from perf.chaos_checks import recovery_counts, run_checks
    from sagas.models import SagaInstance

    order_ids = run.order_ids()
    orders = Order.objects.filter(pk__in=order_ids)
    sagas = SagaInstance.objects.filter(order__in=orders)
    evidence = fault_evidence(run, orders, sagas)
    checks = harness_checks(run, quiet=quiet, work=work) + fault_checks(run, sagas, evidence) + [
        c.as_dict() for c in run_checks(order_ids, initial_on_hand=run.initial_on_hand)
    ]

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
        "sagas_by_state": tally(sagas, "state"),
        "sagas_by_version": {f"v{k}": v for k, v in tally(sagas, "version").items()},
        "client_retries": dict(run.client.errors),
        "web": run.api.summary(),
        "operator": {
            "aborts": dict(Counter(str(status) for _, status in run.ledger.aborts)),
            "retries": dict(Counter(str(status) for _, status in run.ledger.retries)),
        },
        "outages": [
            {"fault": kind, "from_s": start, "to_s": end, "answers": dict(sorted(Counter(
                f"{a.method} {a.path} {a.status}" for a in run.api.answers if a.at <= end and a.at + a.took >= start).items()))}
            for kind, start, end in run.ledger.outages
        ],
        "faults": sorted(run.timeline.entries, key=lambda e: e["t_s"]),
        "exercised": evidence,
        "checks": checks,
        "recovery": {**recovery_counts(order_ids), **message_counts(run)},
        "open_work": {} if quiet else work,
        "violations": sum(c["violations"] for c in checks),
    }


def message_counts(run: Run) -> dict[str, int]:
    """What the workers said about the forged messages (not violations: the log-order check is)."""
    forged = set(run.ledger.forged)
    dropped = set()
    for path in run.cluster.logs():
        for line in Path(path).read_text(errors="replace").splitlines():
            if "saga_message_dropped saga=" in line or "saga_stale_message saga=" in line:
                rest = "saga=" + line.split("saga=", 1)[1]
                fields = dict(f.split("=", 1) for f in rest.split() if "=" in f)
                message = (fields.get("saga"), fields.get("step"), fields.get("direction", "").rstrip(":"))
                if message in forged:
                    dropped.add(message)
    from perf.chaos_checks import poison_recorded_again

    return {
        "forged step messages the workers dropped (out of order, or for a saga no longer running)": len(dropped),
        "poison messages recorded again (redelivered: the pool child refusing it was killed)": poison_recorded_again(run.ledger.poison),
    }


def _resume_quietly(pids) -> None:
    from perf.chaos_faults import resume_processes

    try:
        resume_processes(pids())
    except (OSError, ValueError):
        pass


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


def _keep_logs_on_failure(logs: Callable[[], list[Path]], args, outcome: dict) -> None:
    """The workers', beats' and services' logs are kept under var/chaos/ when the soak failed (or
    broke), deleted otherwise."""
    failed = outcome.get("data", {}).get("violations", 1) > 0
    keep = REPO / "var" / "chaos" / f"{'short' if args.short else 'latest'}-{args.broker}-logs"
    if failed:
        shutil.rmtree(keep, ignore_errors=True)
        keep.mkdir(parents=True)
    for path in logs():
        if failed and path.exists():
            shutil.copy(path, keep / path.name)
        if path.name.startswith("chainsaga-"):  # the celery logs live in /tmp; the others go with the run's directory
            path.unlink(missing_ok=True)
    if failed:
        print(f"worker and beat logs kept in {keep}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
