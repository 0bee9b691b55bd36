"""Helpers to test sagas the way they run in production: a real `celery worker` (and `beat`)
in a subprocess, on the real broker and the test database.

    from sagas.testing import CeleryWorker, inject_fault, wait_for_saga

    def test_payment_declined_releases_stock(saga_worker):      # fixture: sagas.testing.fixtures
        inject_fault("place_order", "charge", kind="business")
        saga = place_order.start(input={...})
        saga = wait_for_saga(saga.id)
        assert saga.state == "COMPENSATED"

Use them with `@pytest.mark.django_db(transaction=True)`: the worker is another process and
only sees committed rows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote
from uuid import UUID

from django.conf import settings
from django.db import connection

from sagas.definition import FORWARD
from sagas.models import TERMINAL_STATES, Fault, FaultKind, SagaInstance
from sagas.selectors import saga_timeline

__all__ = [
    "CeleryBeat",
    "CeleryWorker",
    "FaultKind",
    "inject_fault",
    "purge_queues",
    "subprocess_environment",
    "timeline",
    "wait_for_saga",
]


def inject_fault(
    saga_name: str,
    step: str,
    *,
    kind: str,
    times: int | None = 1,
    direction: str = FORWARD,
    saga_id: UUID | str | None = None,
) -> Fault:
    """Make `step` of `saga_name` fail (kind "business" or "transient"), kill its worker process
    ("crash" before the step commits, "crash_after_commit" after), or arrive twice ("duplicate"),
    for the next `times` deliveries (None: every delivery), optionally for one saga only.
    Needs settings.SAGAS_FAULT_INJECTION."""
    if kind not in FaultKind.values:
        raise ValueError(f"unknown fault kind {kind!r}; use one of {', '.join(FaultKind.values)}")
    return Fault.objects.create(
        saga_name=saga_name, step=step, direction=direction, kind=kind, remaining=times, saga_id=saga_id
    )


def wait_for_saga(saga_id: UUID | str, *, states=TERMINAL_STATES, timeout: float = 30.0) -> SagaInstance:
    """Poll the saga log until the saga reaches one of `states`; AssertionError with its timeline
    if it does not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        saga = SagaInstance.objects.get(pk=saga_id)
        if saga.state in states:
            return saga
        if time.monotonic() > deadline:
            raise AssertionError(f"saga {saga_id} is {saga.state} after {timeout}s, not in {list(states)}\n{timeline(saga_id)}")
        time.sleep(0.05)


def timeline(saga_id: UUID | str) -> str:
    """The saga log of one saga as text, in the order things happened."""
    saga = SagaInstance.objects.get(pk=saga_id)
    lines = [f"saga {saga.id} {saga.name} v{saga.version} {saga.state} {saga.failure_reason}".rstrip()]
    for e in saga_timeline(saga):
        lines.append(
            f"  {e.direction:<10} {e.name:<24} {e.state:<9} attempts={e.attempts} deliveries={e.deliveries} "
            f"started={e.started_at and e.started_at.isoformat()} finished={e.finished_at and e.finished_at.isoformat()} "
            f"{e.last_error}".rstrip()
        )
    return "\n".join(lines)


def purge_queues(*queues: str) -> int:
    """Drop every message waiting in these queues (default: the default and the control queue),
    e.g. between tests."""
    from celery import current_app

    queues = queues or (settings.CELERY_TASK_DEFAULT_QUEUE, settings.SAGAS_CONTROL_QUEUE)
    with current_app.connection_for_write() as conn:
        channel = conn.default_channel
        purged = 0
        for queue in queues:
            try:
                purged += channel.queue_purge(queue) or 0
            except conn.channel_errors:  # RabbitMQ: a queue nobody declared yet
                channel = conn.channel()
        return purged


def database_url(settings_dict: dict) -> str:
    """A DATABASE_URL for the database Django is connected to (the test database, in tests)."""
    engine = settings_dict["ENGINE"]
    if engine.endswith("sqlite3"):
        return f"sqlite:///{Path(settings_dict['NAME']).resolve()}"
    if "postgresql" in engine:
        user = quote(settings_dict.get("USER") or "")
        password = f":{quote(settings_dict['PASSWORD'])}" if settings_dict.get("PASSWORD") else ""
        auth = f"{user}{password}@" if user else ""
        host = settings_dict.get("HOST") or "127.0.0.1"
        port = f":{settings_dict['PORT']}" if settings_dict.get("PORT") else ""
        return f"postgres://{auth}{host}{port}/{settings_dict['NAME']}"
    raise NotImplementedError(f"no DATABASE_URL for engine {engine}")


def subprocess_environment(**overrides: str) -> dict[str, str]:
    """The environment for a worker or beat subprocess: same settings, same (test) database,
    same broker as this process."""
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE=settings.SETTINGS_MODULE,
        DATABASE_URL=database_url(connection.settings_dict),
        CELERY_BROKER_URL=settings.CELERY_BROKER_URL,
        CELERY_TASK_DEFAULT_QUEUE=settings.CELERY_TASK_DEFAULT_QUEUE,
        SAGAS_CONTROL_QUEUE=settings.SAGAS_CONTROL_QUEUE,
        PYTHONUNBUFFERED="1",
    )
    if getattr(settings, "CHAINSAGA_TEST_BACKEND", None):
        env["CHAINSAGA_TEST_BACKEND"] = settings.CHAINSAGA_TEST_BACKEND
    env.update(overrides)
    return env


class _CeleryProcess:
    """A celery subprocess in its own process group, its output in a log file."""

    ready_marker = ""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.args = args
        self.env = env
        self.cwd = cwd or Path(settings.BASE_DIR)
        self.process: subprocess.Popen | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="chainsaga-", suffix=".log")[1])

    def start(self, timeout: float = 60.0):
        env = self.env if self.env is not None else subprocess_environment()
        self._log = open(self.log_path, "ab")
        self._offset = self.log_path.stat().st_size
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.cwd,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while self.ready_marker not in self.output(since_start=True):
            if self.process.poll() is not None:
                raise RuntimeError(f"celery {self.args[0]} exited with {self.process.returncode}:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"celery {self.args[0]} not ready in {timeout}s:\n{self.output()[-3000:]}")
            time.sleep(0.1)
        return self

    def output(self, *, since_start: bool = False) -> str:
        text = self.log_path.read_bytes()
        if since_start:
            text = text[self._offset :]
        return text.decode(errors="replace")

    def wait_for_output(self, text: str, *, timeout: float = 30.0) -> str:
        """Until `text` appears in what the process printed since it started; AssertionError with
        the tail of its log if it does not within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while text not in (output := self.output(since_start=True)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in celery {self.args[0]}'s output after {timeout}s:\n{output[-3000:]}")
            time.sleep(0.05)
        return output

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown (SIGTERM: finish the task in hand), then kill if it hangs."""
        if not self.alive:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._reap_group()

    def kill(self) -> None:
        """kill -9 the whole process group: the main process and every child."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self._reap_group()

    def _reap_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class CeleryWorker(_CeleryProcess):
    """`celery worker` (prefork) in a subprocess. Consumes the default queue unless told others."""

    ready_marker = " ready."

    def __init__(
        self,
        *,
        queues: list[str] | None = None,
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        include: list[str] | None = None,
    ):
        """`include`: extra modules of tasks to import (celery worker --include). By default the
        worker consumes the default queue and the control queue (the sweeper and housekeeping)."""
        self.name = f"test-{uuid.uuid4().hex[:8]}@%h"
        queues = queues or [settings.CELERY_TASK_DEFAULT_QUEUE, settings.SAGAS_CONTROL_QUEUE]
        super().__init__(
            [
                "worker",
                "--loglevel=INFO",
                "--pool=prefork",
                f"--concurrency={concurrency}",
                f"--queues={','.join(queues)}",
                f"--hostname={self.name}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                *([f"--include={','.join(include)}"] if include else []),
            ],
            env=env,
        )

    def children(self) -> list[int]:
        """Pids of the pool's child processes (the ones that run tasks)."""
        # A child forked by the pool's maintenance thread is listed under that thread.
        threads = Path(f"/proc/{self.process.pid}/task").glob("*/children")
        return [int(pid) for path in threads for pid in path.read_text().split()]

    def kill_children(self) -> list[int]:
        """kill -9 every pool child: the task in hand dies; the worker forks new children."""
        pids = self.children()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids


class CeleryBeat(_CeleryProcess):
    """`celery beat` in a subprocess, with its own schedule file."""

    ready_marker = "beat: Starting"

    def __init__(self, *, env: dict[str, str] | None = None):
        schedule = Path(tempfile.mkdtemp(prefix="chainsaga-beat-")) / "schedule"
        super().__init__(["beat", "--loglevel=INFO", f"--schedule={schedule}"], env=env)
