"""Outages as a client sees them (rule 15; issue 9, case 4): with PostgreSQL, the cache or the broker
down or frozen, every endpoint answers within 5 s: a JSON 503 with Retry-After when it cannot do
its work, its normal answer when it can (throttles fail open without the cache; an order whose
transaction committed is 201 without the broker, and the sweeper sends its first step later).

Runs gunicorn on a private PostgreSQL cluster and two private Redis servers (cache and broker), so
stopping and freezing them touches nothing else."""

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.conf import settings

from perf.services import PrivatePostgres, PrivateRedis, free_port
from sagas.testing import CeleryBeat, CeleryWorker, subprocess_environment

pytestmark = pytest.mark.services(reason="stops and freezes private PostgreSQL and Redis servers")

WITHIN = 5.0  # seconds: the longest any answer may take during an outage
HEALTH_TOKEN = uuid.uuid4().hex


class Stack:
    """gunicorn on private services, seeded with the demo catalogue and customer."""

    def __init__(self, root: Path):
        self.root = root
        self.pg = PrivatePostgres(Path(tempfile.mkdtemp(prefix="chainsaga-outage-pg-")))  # its own: chowned to postgres
        self.cache = PrivateRedis(root)
        self.broker = PrivateRedis(root)
        self.port = free_port()
        self.server: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        queue = f"chainsaga-outage-{self.port}"
        return subprocess_environment(
            DATABASE_URL=self.pg.url, REDIS_URL=self.cache.url(0), CELERY_BROKER_URL=self.broker.url(0),
            CELERY_TASK_DEFAULT_QUEUE=queue, SAGAS_CONTROL_QUEUE=f"{queue}-control",
            PAYMENTS_PROVIDER_PATH=str(self.root / "provider.sqlite3"), SAGAS_SWEEP_INTERVAL="1",
            HEALTH_TOKEN=HEALTH_TOKEN, SAGAS_HEARTBEAT_INTERVAL="1", WORKERS_STALLED_AFTER="3",
        )

    def start(self) -> "Stack":
        self.pg.start(), self.cache.start(), self.broker.start()
        for command in (["migrate", "--noinput"], ["seed_demo"]):
            subprocess.run([sys.executable, "manage.py", *command], cwd=settings.BASE_DIR, env=self.env(), check=True,
                           capture_output=True, timeout=180)
        self.server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "config.wsgi:application", "--bind", f"127.0.0.1:{self.port}", "--workers", "1"],
            cwd=settings.BASE_DIR, env=self.env(), stdout=subprocess.DEVNULL, stderr=open(self.root / "gunicorn.log", "wb"),
        )
        deadline = time.monotonic() + 30
        while self.request("GET", "/api/health/", timeout=5)[0] is None:
            if time.monotonic() > deadline:
                raise RuntimeError("gunicorn did not answer")
            time.sleep(0.2)
        self.token = self.request("POST", "/api/auth/token/", {"username": "demo", "password": "demo-password"})[1]["token"]
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
        for service in (self.cache, self.broker):
            _resume(service.process.pid) if service.process else None
            service.stop()
        for pid in _quietly(self.pg.pids):
            _resume(pid)
        self.pg.stop()

    def request(self, method: str, path: str, body=None, *, token: str | None = None, key: str | None = None, timeout: float = 30):
        """(status, JSON body or None, headers, seconds); status None when nothing answered."""
        headers = {"Content-Type": "application/json"}
        if token == HEALTH_TOKEN:
            headers["Authorization"] = f"Bearer {token}"
        elif token:
            headers["Authorization"] = f"Token {token}"
        if key:
            headers["Idempotency-Key"] = key
        started = time.monotonic()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, json.dumps(body) if body is not None else None, headers)
            response = connection.getresponse()
            raw = response.read()
        except OSError:
            return None, None, {}, time.monotonic() - started
        finally:
            connection.close()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        return response.status, parsed, dict(response.getheaders()), time.monotonic() - started

    def place_order(self):
        body = {"items": [{"sku": "KBD-001", "quantity": 1}], "payment_method": "pm_ok"}
        return self.request("POST", "/api/orders/", body, token=self.token, key=uuid.uuid4().hex)


def _quietly(function):
    try:
        return function()
    except (OSError, ValueError):
        return []


def _resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


@contextmanager
def frozen(pids: list[int]):
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            _resume(pid)


@pytest.fixture(scope="module")
def stack():
    root = Path(tempfile.mkdtemp(prefix="chainsaga-outage-"))
    stack = Stack(root)
    try:
        yield stack.start()
    finally:
        stack.stop()


# (method, path, with the customer's token, statuses that are right while the database is out).
# The admin's login form needs no database to be shown; its POST is refused by CSRF before any.
EVERY_KIND_OF_ENDPOINT = [
    ("GET", "/api/health/", False, {503}),
    ("GET", "/api/orders/", True, {503}),
    ("GET", "/api/products/", True, {503}),
    ("POST", "/api/auth/token/", False, {503}),
    ("GET", "/admin/login/", False, {200, 503}),
]


def assert_unavailable(stack: Stack) -> None:
    for method, path, with_token, expected in EVERY_KIND_OF_ENDPOINT:
        body = {"username": "demo", "password": "demo-password"} if path == "/api/auth/token/" else None
        status, answer, headers, took = stack.request(method, path, body, token=stack.token if with_token else None)
        assert took < WITHIN, f"{method} {path} took {took:.1f}s"
        assert status in expected, f"{method} {path}: {status} {answer}"
        if status == 503:
            assert headers.get("Retry-After") and answer is not None, f"{method} {path}: {headers} {answer}"
    status, answer, headers, took = stack.place_order()
    assert (status, took < WITHIN) == (503, True), (status, answer, took)


def test_with_postgresql_down_every_endpoint_answers_a_json_503_with_retry_after(stack):
    stack.pg.shut_down()
    try:
        assert_unavailable(stack)
    finally:
        stack.pg.start_again()
    assert stack.place_order()[0] == 201


def test_with_postgresql_frozen_every_endpoint_answers_a_json_503_within_5_seconds(stack):
    assert stack.request("GET", "/api/orders/", token=stack.token)[0] == 200  # a connection is open and reused
    with frozen(stack.pg.pids()):
        assert_unavailable(stack)
    assert stack.request("GET", "/api/orders/", token=stack.token)[0] == 200


@pytest.mark.parametrize("fault", ["down", "frozen"])
def test_with_the_cache_down_or_frozen_the_api_still_serves_and_health_says_degraded(stack, fault):
    with _cache_fault(stack, fault):
        answers = [stack.request("GET", "/api/orders/", token=stack.token) for _ in range(5)]
        health = stack.request("GET", "/api/health/")

    assert [status for status, *_ in answers] == [200] * 5
    assert max(took for *_, took in answers) < WITHIN
    assert health[0] == 200 and health[1] == {"status": "degraded"} and health[3] < WITHIN


@contextmanager
def _cache_fault(stack: Stack, fault: str):
    if fault == "frozen":
        with frozen([stack.cache.process.pid]):
            yield
        return
    stack.cache.stop()
    try:
        yield
    finally:
        stack.cache.start()


@pytest.mark.parametrize("fault", ["down", "frozen"])
@pytest.mark.django_db(transaction=True)
def test_with_the_broker_down_or_frozen_an_order_is_201_and_the_sweeper_sends_it_later(stack, fault):
    with _broker_fault(stack, fault):
        status, order, _, took = stack.place_order()
        health = stack.request("GET", "/api/health/")

    assert (status, took < WITHIN) == (201, True), (status, order, took)
    assert health[0] == 503 and health[1] == {"status": "down"} and health[3] < WITHIN
    env = stack.env()
    with CeleryWorker(env=env, queues=[env["CELERY_TASK_DEFAULT_QUEUE"], env["SAGAS_CONTROL_QUEUE"]]), CeleryBeat(env=env):
        deadline = time.monotonic() + 60
        while stack.request("GET", f"/api/orders/{order['id']}/", token=stack.token)[1]["status"] == "pending":
            assert time.monotonic() < deadline, "the sweeper never sent the order's first step"
            time.sleep(0.5)
    assert stack.request("GET", f"/api/orders/{order['id']}/", token=stack.token)[1]["status"] == "confirmed"


@contextmanager
def _broker_fault(stack: Stack, fault: str):
    if fault == "frozen":
        with frozen([stack.broker.process.pid]):
            yield
        return
    stack.broker.stop()
    try:
        yield
    finally:
        stack.broker.start()


def wait_for_health(stack: Stack, predicate, *, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = stack.request("GET", "/api/health/", token=HEALTH_TOKEN)[1]
        if predicate(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.5)


def test_health_tells_a_dead_a_stalled_and_a_working_worker_and_a_stopped_sweeper_apart(stack):
    def reasons(body) -> str:
        return " | ".join(body.get("reasons", []))

    # No worker at all
    body = wait_for_health(stack, lambda b: "no celery worker alive" in reasons(b))
    assert body["status"] == "degraded", body

    env = stack.env()
    worker = CeleryWorker(env=env, queues=[env["CELERY_TASK_DEFAULT_QUEUE"], env["SAGAS_CONTROL_QUEUE"]]).start()
    beat = CeleryBeat(env=env).start()
    try:
        # A worker that takes work, and the sweeper running
        body = wait_for_health(stack, lambda b: b["status"] == "ok")
        assert body["status"] == "ok" and [w["hostname"] for w in body["workers"]] == [worker.name.replace("%h", os.uname().nodename)], body

        # Its pool frozen while orders wait: alive, but stalled
        with frozen(worker.children()):
            for _ in range(4):
                assert stack.place_order()[0] == 201
            body = wait_for_health(stack, lambda b: "no worker took a task" in reasons(b))
            assert body["status"] == "degraded", body
        assert wait_for_health(stack, lambda b: b["status"] == "ok")["status"] == "ok"

        # The whole worker frozen: its heartbeat stops
        with frozen([worker.process.pid, *worker.children()]):
            body = wait_for_health(stack, lambda b: "no celery worker alive" in reasons(b))
            assert body["status"] == "degraded", body
        assert wait_for_health(stack, lambda b: b["status"] == "ok")["status"] == "ok"

        # Beat gone: nothing sweeps any more
        beat.stop()
        body = wait_for_health(stack, lambda b: "the sweeper last ran" in reasons(b))
        assert body["status"] == "degraded", body
    finally:
        beat.stop()
        worker.kill()
