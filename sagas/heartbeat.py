"""Worker liveness for the health check: each celery worker's main process writes a
WorkerHeartbeat row every SAGAS_HEARTBEAT_INTERVAL seconds from a thread of its own (so a database
that hangs cannot block the worker's event loop), with how many tasks it accepted and when it
last made progress. A worker that is frozen or gone stops beating; one whose pool is stuck keeps
beating without progress."""

from __future__ import annotations

import logging
import os
import threading
from datetime import datetime, timedelta

from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone

log = logging.getLogger("sagas")

_beating: Heartbeat | None = None


class Heartbeat(threading.Thread):
    def __init__(self, *, hostname: str, queues: list[str], interval: float):
        super().__init__(name="sagas-heartbeat", daemon=True)
        self.hostname, self.queues, self.interval = hostname, queues, interval
        self.started_at = timezone.now()
        self.stopping = threading.Event()
        self._seen: tuple[int, int] | None = None
        self._progress_at = self.started_at
        self._failing = False

    def run(self) -> None:
        while True:
            try:
                self.beat(now=timezone.now())
            finally:
                connection.close()  # this thread's; not left open for the pool's next fork
            if self.stopping.wait(self.interval):
                return

    def beat(self, *, now: datetime) -> None:
        from celery.worker import state

        from sagas.models import WorkerHeartbeat

        seen = (state.all_total_count[0], len(state.active_requests))
        if seen != self._seen:
            self._seen, self._progress_at = seen, now
        try:
            WorkerHeartbeat.objects.update_or_create(
                hostname=self.hostname,
                defaults={
                    "pid": os.getpid(),
                    "queues": ",".join(self.queues)[:500],
                    "started_at": self.started_at,
                    "beat_at": now,
                    "accepted": seen[0],
                    "active": seen[1],
                    "progress_at": self._progress_at,
                },
            )
            if self._failing:
                log.info("worker_heartbeat_restored hostname=%s", self.hostname)
            self._failing = False
        except DatabaseError as exc:
            if not self._failing:  # once per outage, not every beat
                log.warning("worker_heartbeat_failed hostname=%s: %s", self.hostname, type(exc).__name__)
            self._failing = True

    def stop(self) -> None:
        from sagas.models import WorkerHeartbeat

        self.stopping.set()
        self.join(timeout=self.interval + 5)
        try:
            WorkerHeartbeat.objects.filter(hostname=self.hostname).delete()  # a clean stop is not a dead worker
        except DatabaseError:
            pass
        finally:
            connection.close()


def on_worker_ready(sender=None, **kwargs) -> None:
    global _beating
    queues = sorted(getattr(sender.app.amqp.queues, "consume_from", None) or sender.app.amqp.queues)
    _beating = Heartbeat(hostname=sender.hostname, queues=queues, interval=settings.SAGAS_HEARTBEAT_INTERVAL)
    _beating.start()


def on_worker_shutdown(**kwargs) -> None:
    if _beating is not None:
        _beating.stop()


def workers_live(*, now: datetime):
    """Heartbeats recent enough that their worker is taken as alive (three intervals)."""
    from sagas.models import WorkerHeartbeat

    return WorkerHeartbeat.objects.filter(beat_at__gte=now - timedelta(seconds=3 * settings.SAGAS_HEARTBEAT_INTERVAL))
