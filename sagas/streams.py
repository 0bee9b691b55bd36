"""Durable event streams (DESIGN.md rule 16): a Redis stream that lost entries is found and the
retained events are published to it again.

Redis can lose stream entries whose outbox rows are already marked published: a restart without
persistence loses them all, a crash with `appendfsync everysec` up to the last second. So the relay
remembers, per stream, the newest entry it wrote (OutboxStream.last_entry_id, committed in the
round that marked those events published), and adds each batch to a stream with one Lua script
that first checks this entry is still there. Counting entries would not do: after a restart new
entries get new, larger ids, so a stream can be as long as before and still have lost some. If
the entry is gone, the script adds nothing (no batch lands after a gap); the relay defers the
batch and recovers the stream (`stream_recover`):

- one relay at a time (a lease on the OutboxStream row; the others keep deferring that stream);
- the newest entry that survived (the newest at or before the lost one) carries its event's
  `created_at`. Every event added after it was published after that, so every retained event of
  the aggregate type published since then (less CLOCK_SKEW) is added again, in `sequence` order
  (an aggregate's publication order), in batches; if nothing survived, every retained event;
- then last_entry_id points at the last entry added, the deferred batch follows, and the order of
  each aggregate's events in the stream is kept. Some events go out twice; consumers dedupe by id.

A loss is also looked for when nothing is being published: `streams_verify` checks every stream's
remembered entry (one pipelined XRANGE per stream), which the relay runs at the start of a run,
at most every OUTBOX_STREAM_CHECK_INTERVAL seconds per process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from sagas.models import OutboxEvent, OutboxStream

log = logging.getLogger("sagas.outbox")

# Published events are compared with the surviving entry's created_at, which another host's clock
# wrote: a margin for clocks that disagree. Re-publishing a little more is harmless.
CLOCK_SKEW = timedelta(seconds=5)
# How long a relay may hold a stream's recovery before another takes over; renewed every batch.
RECOVERY_LEASE = timedelta(seconds=60)

# KEYS[1]: the stream. ARGV[1]: the entry id last written to it ("" for none), ARGV[2]: MAXLEN,
# then per entry its number of field/value items followed by them. Returns the new entry ids, or
# 0 without adding anything when the remembered entry is gone.
APPEND_SCRIPT = """
local last = ARGV[1]
if last ~= '' and #redis.call('XRANGE', KEYS[1], last, last, 'COUNT', 1) == 0 then
  return 0
end
local ids = {}
local i = 3
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  ids[#ids + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return ids
"""


def append(pipe, *, stream: str, last_entry_id: str, messages: Sequence[dict[str, str]], maxlen: int) -> None:
    """Queue, on a pipeline, the checked append of `messages` to `stream` (see APPEND_SCRIPT). The
    script text goes with each call (EVAL): Redis caches it, and a restarted Redis, which forgot its
    scripts, needs no second round trip."""
    args: list[str | int] = [last_entry_id, maxlen]
    for message in messages:
        args.append(2 * len(message))
        for field, value in message.items():
            args += [field, value]
    pipe.eval(APPEND_SCRIPT, 1, stream, *args)


def appended_ids(result) -> list[str] | None:
    """The entry ids an append added, or None when it found the stream had lost entries."""
    if result == 0:
        return None
    return [entry_id.decode() if isinstance(entry_id, bytes) else entry_id for entry_id in result]


def positions(names) -> dict[str, str]:
    """The entry id last written to each of these streams (absent: never written)."""
    return dict(OutboxStream.objects.filter(name__in=list(names)).values_list("name", "last_entry_id"))


def positions_record(written: dict[str, tuple[str, str]], *, now: datetime) -> None:
    """Remember the last entry written to each stream ({stream: (aggregate type, entry id)}), in
    one statement, in the caller's transaction. Rows are written in name order, so two relays
    recording the same streams cannot deadlock."""
    if not written:
        return
    OutboxStream.objects.bulk_create(
        [
            OutboxStream(name=name, aggregate_type=aggregate_type, last_entry_id=entry_id, updated_at=now)
            for name, (aggregate_type, entry_id) in sorted(written.items())
        ],
        update_conflicts=True,
        unique_fields=["name"],
        update_fields=["last_entry_id", "updated_at"],
    )


def streams_verify(client, *, maxlen: int, batch_size: int) -> int:
    """Check that every stream still holds the entry last written to it, and recover those that do
    not. Returns how many events were published again."""
    remembered = list(OutboxStream.objects.exclude(last_entry_id="").values_list("name", "last_entry_id"))
    if not remembered:
        return 0
    pipe = client.pipeline(transaction=False)
    for name, entry_id in remembered:
        pipe.xrange(name, entry_id, entry_id, count=1)
    found = pipe.execute()
    lost = [name for (name, _), entries in zip(remembered, found, strict=True) if not entries]
    return sum(stream_recover(client, name=name, maxlen=maxlen, batch_size=batch_size) for name in lost)


def stream_recover(client, *, name: str, maxlen: int, batch_size: int) -> int:
    """Publish again, to stream `name`, every retained event that was published after the newest
    entry that survived (all retained events if none did), unless the stream still holds its
    remembered entry or another relay is already at it. Returns how many events were published.
    Runs outside a transaction: each batch is on Redis before the lease is renewed."""
    lease = _lease_take(name)
    if lease is None:
        return 0  # another relay is recovering it; this one's batches for it wait
    try:
        row = OutboxStream.objects.get(name=name)
        lost_id = row.last_entry_id
        if not lost_id or client.xrange(name, lost_id, lost_id, count=1):
            return 0  # recovered meanwhile, or never lost
        [(survivor_id, survivor_fields)] = client.xrevrange(name, max=lost_id, min="-", count=1) or [(None, {})]
        since = _created_at(survivor_fields)
        since = since - CLOCK_SKEW if since is not None else None
        log.warning(
            "outbox_stream_lost stream=%s last_entry=%s newest_surviving_entry=%s: publishing again the retained %s events %s",
            name, lost_id, _text(survivor_id) or "none", row.aggregate_type,
            f"published since {since.isoformat()}" if since else "(all of them)",
        )

        def progress(done: int, total: int) -> None:
            nonlocal lease
            log.info("outbox_stream_republish stream=%s %s/%s", name, done, total)
            lease = _lease_renew(name, lease)

        try:
            count, last_id = stream_republish(
                client, stream=name, aggregate_type=row.aggregate_type, since=since, maxlen=maxlen, batch_size=batch_size,
                progress=progress,
            )
        except RecoveryLeaseLost:
            log.warning("outbox_stream_recovery_taken_over stream=%s: another relay holds it now", name)
            return 0
        new_last = last_id or _text(survivor_id) or ""
        now = timezone.now()
        # A round that added entries before the loss may commit only now, naming a lost entry:
        # then last_entry_id keeps that one, and the next check recovers again.
        OutboxStream.objects.filter(name=name).update(
            last_entry_id=Case(When(last_entry_id=lost_id, then=Value(new_last)), default=F("last_entry_id")),
            recoveries=F("recoveries") + 1,
            republished=F("republished") + count,
            last_recovered_at=now,
            updated_at=now,
        )
        log.warning("outbox_stream_recovered stream=%s republished=%s last_entry=%s", name, count, new_last)
        return count
    finally:
        OutboxStream.objects.filter(name=name, recovery_lease_until=lease).update(recovery_lease_until=None)


def stream_republish(
    client,
    *,
    stream: str,
    aggregate_type: str,
    since: datetime | None,
    maxlen: int,
    batch_size: int,
    progress: Callable[[int, int], object] | None = None,
) -> tuple[int, str]:
    """Add again to `stream` every retained event of `aggregate_type` published at or after `since`
    (None: all), in sequence order, `batch_size` per round trip, calling `progress(done, total)`
    after each batch. Returns (events added, the last entry id or "")."""
    from sagas.publishers import message

    retained = OutboxEvent.objects.filter(aggregate_type=aggregate_type, published_at__isnull=False)
    if since is not None:
        retained = retained.filter(published_at__gte=since)
    total, done, cursor, last_id = retained.count(), 0, 0, ""
    while True:
        batch = list(retained.filter(sequence__gt=cursor).order_by("sequence")[:batch_size])
        if not batch:
            return done, last_id
        pipe = client.pipeline(transaction=False)
        for event in batch:
            pipe.xadd(stream, message(event), maxlen=maxlen, approximate=True)
        last_id = _text(pipe.execute()[-1])
        done, cursor = done + len(batch), batch[-1].sequence
        if progress is not None:
            progress(done, max(total, done))


def _lease_take(name: str) -> datetime | None:
    now = timezone.now()
    until = now + RECOVERY_LEASE
    free = Q(recovery_lease_until__isnull=True) | Q(recovery_lease_until__lt=now)
    taken = OutboxStream.objects.filter(free, name=name).update(recovery_lease_until=until)
    return until if taken else None


def _lease_renew(name: str, lease: datetime) -> datetime:
    until = timezone.now() + RECOVERY_LEASE
    if not OutboxStream.objects.filter(name=name, recovery_lease_until=lease).update(recovery_lease_until=until):
        raise RecoveryLeaseLost(f"{name}: another relay took over the recovery")
    return until


class RecoveryLeaseLost(RuntimeError):
    """This relay held a stream's recovery longer than RECOVERY_LEASE without renewing it."""


def _created_at(fields: dict) -> datetime | None:
    """The created_at an outbox entry carries; None for no entry, or one that is not the relay's
    (then everything retained is published again)."""
    try:
        return datetime.fromisoformat(fields[b"created_at"].decode())
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
