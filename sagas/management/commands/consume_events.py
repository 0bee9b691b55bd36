"""Read an outbox stream with a Redis consumer group: what a service outside the monolith runs.

    python manage.py consume_events --stream events.order --group fulfillment [--handler NAME]

Each message is acknowledged (XACK) only after it was handled, so a consumer that dies leaves it
pending; at start and then every --claim-every seconds, messages pending on another consumer for
longer than --claim-idle ms are claimed (XAUTOCLAIM) and handled here. With --handler, the
message runs that registered sagas.consumers subscription behind its inbox (a redelivery is a
no-op); without, it is only shown. A message whose handling fails stays pending and is retried
by a later reclaim; after --max-deliveries it is copied to `<stream>.dead-letter` and acked, so
one bad message cannot stall the stream. A group lives inside its stream: if Redis lost the
stream (a restart without persistence), the group is created again from the stream's start, and
the events the relay publishes again are read once more (the inbox makes them no-ops).
"""

import os
import socket
import time

import redis
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from sagas.consumers import ConsumedEvent, consume


class Command(BaseCommand):
    help = "Consume an outbox Redis stream with a consumer group (XREADGROUP/XACK/XAUTOCLAIM), showing each event."

    def add_arguments(self, parser):
        parser.add_argument("--stream", required=True, help="e.g. events.order")
        parser.add_argument("--group", required=True, help="consumer group; created at the stream's start if new")
        parser.add_argument("--consumer", default=f"{socket.gethostname()}-{os.getpid()}", help="this consumer's name")
        parser.add_argument("--handler", default=None, help="a registered consumer (sagas.consumers.subscribe) to run")
        parser.add_argument("--batch", type=int, default=100)
        parser.add_argument("--block", type=int, default=2000, help="ms to wait for new messages")
        parser.add_argument("--claim-idle", type=int, default=60_000, help="reclaim messages pending this many ms")
        parser.add_argument("--claim-every", type=float, default=30.0, help="seconds between reclaim passes")
        parser.add_argument("--max-deliveries", type=int, default=5, help="tries before a message is dead-lettered")
        parser.add_argument("--max-messages", type=int, default=None, help="stop after this many (default: run forever)")
        parser.add_argument("--idle-exit", type=float, default=None, help="stop after this many seconds without messages")

    def handle(
        self, *args, stream, group, consumer, handler, batch, block, claim_idle, claim_every, max_deliveries, max_messages,
        idle_exit, **options,
    ):
        if not settings.REDIS_URL:
            raise CommandError("REDIS_URL is not set: the event streams live in Redis")
        client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
        _group_create(client, stream, group)
        self.stdout.write(f"consuming {stream} as {group}/{consumer}" + (f", handler {handler}" if handler else ""))
        handled, last_claim, last_message, claim_cursor = 0, 0.0, time.monotonic(), "0-0"
        while max_messages is None or handled < max_messages:
            entries = []
            try:
                if time.monotonic() - last_claim >= claim_every:
                    claim_cursor, claimed, *_ = client.xautoclaim(
                        stream, group, consumer, min_idle_time=claim_idle, start_id=claim_cursor, count=batch
                    )
                    entries = [(entry_id, fields) for entry_id, fields in claimed if fields]
                    if claim_cursor == "0-0":  # the scan wrapped: wait for the next pass
                        last_claim = time.monotonic()
                    if entries:
                        self.stdout.write(f"reclaimed {len(entries)} message(s) left pending by another consumer")
                if not entries:
                    response = client.xreadgroup(group, consumer, {stream: ">"}, count=batch, block=block)
                    entries = response[0][1] if response else []
            except redis.ResponseError as exc:
                # NOGROUP: the stream (and the group in it) is gone; UNBLOCKED: it went while we waited.
                if not str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                self.stdout.write(f"{stream} lost its group {group} (Redis lost the stream): creating it again from the start")
                _group_create(client, stream, group)
                claim_cursor = "0-0"
                continue
            if not entries:
                if idle_exit is not None and time.monotonic() - last_message >= idle_exit:
                    break
                continue
            last_message = time.monotonic()
            for entry_id, fields in entries:
                try:
                    outcome = self._handle(handler, fields)
                except Exception as exc:  # noqa: BLE001 - the process boundary: recorded, never stalls the stream
                    outcome = self._failed(client, stream, group, entry_id, fields, exc, max_deliveries)
                    if outcome is None:
                        continue
                client.xack(stream, group, entry_id)
                handled += 1
                self.stdout.write(
                    f"{entry_id} {fields.get('type')} {fields.get('aggregate_type')}:{fields.get('aggregate_id')} {outcome}"
                )
                if max_messages is not None and handled >= max_messages:
                    break
        self.stdout.write(f"processed {handled} message(s)")

    def _failed(self, client, stream, group, entry_id, fields, exc, max_deliveries) -> str | None:
        """None: left pending for a later try; else the outcome of dead-lettering it (then acked)."""
        [pending] = client.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
        tries = pending["times_delivered"]
        if tries < max_deliveries:
            self.stdout.write(f"{entry_id} {fields.get('type')} failed (try {tries} of {max_deliveries}): {exc}; left pending")
            return None
        client.xadd(f"{stream}.dead-letter", {**fields, "error": f"{type(exc).__name__}: {exc}", "group": group})
        return f"dead-lettered after {tries} tries: {exc}"

    def _handle(self, handler: str | None, fields: dict) -> str:
        if handler is None:
            ConsumedEvent.from_message(fields)  # a malformed message fails here, before the ack
            return "shown"
        return "handled" if consume(consumer=handler, message=fields) else "duplicate (inbox)"


def _group_create(client, stream: str, group: str) -> None:
    """The consumer group at the start of the stream (created empty if need be), unless it exists."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
