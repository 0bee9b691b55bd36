"""The chaos soak's invariant checks and recovery counts, over the orders one run placed. Imported
after django.setup(); every check is a selector of the app it belongs to."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from django.utils import timezone

from inventory.selectors import stock_ledger_violations
from orders.models import Order, OrderStatus
from orders.selectors import (
    money_violations,
    order_reservation_violations,
    order_saga_mismatches,
    stock_violations,
)
from payments.gateway import gateway
from payments.selectors import provider_ledger_violations, provider_net_by_reference, provider_repeated_calls
from sagas.models import OutboxEvent, SagaInstance
from sagas.models import ParkedDelivery, SagaState
from sagas.selectors import (
    consumer_duplicates_absorbed,
    consumer_inbox_gaps,
    outbox_repeated_events,
    outbox_stats,
    outbox_stream_gaps,
    outbox_stream_recoveries,
    outbox_unpublished,
    rejected_message_counts,
    saga_recovery_counts,
    saga_step_order_violations,
    sagas_unfinished,
)
from sagas.versions import saga_definition_mismatches

# Each of these happens at most once per order in both flows; a second one is an effect that ran
# twice (a duplicate delivery no inbox or idempotency key absorbed).
ONCE_PER_ORDER = (
    "ORDER_CREATED", "PAYMENT_PROCESSED", "PAYMENT_FAILED", "INVENTORY_RESERVED", "STOCK_UNAVAILABLE",
    "INVENTORY_RELEASED", "PAYMENT_REFUNDED", "ORDER_CONFIRMED", "FULFILLMENT_REQUESTED", "ORDER_CANCELLED",
)
EXAMPLES = 20  # violations listed per check in the report


@dataclass
class Check:
    name: str
    checked: int  # how many things the check looked at
    violations: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"name": self.name, "checked": self.checked, "violations": len(self.violations), "examples": self.violations[:EXAMPLES]}


def open_work(order_ids) -> dict[str, int]:
    """What is still in flight: the soak is quiet when every count is zero."""
    orders = Order.objects.filter(pk__in=order_ids)
    return {
        "pending orders": orders.filter(status=OrderStatus.PENDING).count(),
        "unfinished sagas": sagas_unfinished(SagaInstance.objects.filter(order__in=orders)).count(),
        "unpublished events": outbox_unpublished().count(),
        "unhandled deliveries": len(consumer_inbox_gaps()),
    }


def settled_count(order_ids) -> int:
    return Order.objects.filter(pk__in=order_ids).exclude(status=OrderStatus.PENDING).count()


def run_checks(order_ids, *, initial_on_hand: dict[str, int]) -> list[Check]:
    orders = Order.objects.filter(pk__in=order_ids)
    sagas = SagaInstance.objects.filter(order__in=orders)
    ledger = gateway().ledger()
    events = OutboxEvent.objects.count()
    unfinished = sagas_unfinished(sagas).values_list("id", "state")
    unpublished = outbox_unpublished().values_list("id", "event_type", "dead_lettered_at")
    repeated = outbox_repeated_events(aggregate_type="order", event_types=ONCE_PER_ORDER)
    backlog = outbox_stats(now=timezone.now())
    checks = [
        Check("every saga terminal (COMPLETED, COMPENSATED, or FAILED with a reason)", sagas.count(),
              [f"saga {saga_id} is {state}" for saga_id, state in unfinished]),
        Check("every order confirmed or cancelled, matching its saga", orders.count(), order_saga_mismatches(orders)),
        Check("stock: reserved = live reservations, within 0..on hand", len(initial_on_hand), stock_violations()),
        Check("stock: on hand + committed = initial, never negative", len(initial_on_hand),
              stock_ledger_violations(initial_on_hand=initial_on_hand)),
        Check("reservations: committed = lines if confirmed, none held if cancelled", orders.count(),
              order_reservation_violations(orders)),
        Check("money, our books: charged - refunded = total if confirmed, 0 if cancelled", orders.count(), money_violations(orders)),
        Check("money, provider's ledger: charged - refunded = total if confirmed, 0 if cancelled", orders.count(),
              money_violations(orders, net_charged=provider_net_by_reference(ledger))),
        Check("no double charge: provider ledger = our payments, one charge per key and order", len(ledger.charges),
              provider_ledger_violations(ledger)),
        Check("every committed outbox event published (none lost)", events,
              [f"{event_type} {event_id}{' dead-lettered' if parked else ''}" for event_id, event_type, parked in unpublished]),
        Check("every published event handled once by each subscribed consumer (inbox)", events,
              [f"{consumer} never handled {event_type} {event_id}" for consumer, event_id, event_type in consumer_inbox_gaps()]),
        Check("no effect repeated: each order event emitted at most once per order", events,
              [f"order {aggregate_id}: {event_type} x{n}" for aggregate_id, event_type, n in repeated]),
        _stream_check(),
        Check("outbox backlog back to zero (none dead-lettered)", 1,
              [f"backlog {backlog['backlog']}, dead-lettered {backlog['dead_lettered']}"] if backlog["backlog"] or backlog["dead_lettered"] else []),
    ]
    return checks


def log_order_check(sagas) -> Check:
    """Forged and stray step messages (issue 9, case 2): none took effect."""
    return Check("saga log order: no forged or stray step message took effect (forward steps completed in order, "
                 "compensations only of steps that took effect)", sagas.count(), saga_step_order_violations(sagas))


def versions_check(sagas) -> Check:
    """The deploy mid-run (issue 9, case 3): each saga ran on the definition it started with."""
    return Check("versions: every saga ran on the definition registered for its version (fingerprint)", sagas.count(),
                 saga_definition_mismatches(sagas))


# A poison message is recorded before its rejection is acknowledged: a pool child killed in between
# (the soak kills one every few seconds) has it delivered and recorded again, at least once as
# every delivery is. More than this many records is a message requeued in a loop.
POISON_RECORDS_AT_MOST = 3


def poison_check(tokens: list[str]) -> Check:
    """Poison messages (issue 9, case 1): each one the soak sent was refused and recorded; one never
    recorded was lost (or never refused), one recorded again and again is looping."""
    counts = rejected_message_counts(tokens)
    return Check(f"poison messages: each rejected and recorded (RejectedMessage), at least once and at most "
                 f"{POISON_RECORDS_AT_MOST} times", len(tokens),
                 [f"poison message {token} recorded {n} times" for token, n in counts.items()
                  if not 1 <= n <= POISON_RECORDS_AT_MOST])


def poison_recorded_again(tokens: list[str]) -> int:
    """Records beyond the first, of the poison messages the soak sent (deliveries cut short)."""
    return sum(max(0, n - 1) for n in rejected_message_counts(tokens).values())


def abort_check(aborts: list[tuple[str, int | None]]) -> Check:
    """Operator aborts: a saga whose abort was accepted (202) is undone, never completed."""
    accepted = [saga_id for saga_id, status in aborts if status == 202]
    states = dict(SagaInstance.objects.filter(pk__in=accepted).values_list("pk", "state"))
    return Check("operator abort: every saga whose abort was accepted (202) was undone, not completed", len(accepted),
                 [f"saga {saga_id} was aborted (202) but ended {states.get(UUID(saga_id), 'missing')}" for saga_id in accepted
                  if states.get(UUID(saga_id)) not in (SagaState.COMPENSATED, SagaState.FAILED)])


def thaw_check(thawed: list[dict]) -> Check:
    """A worker frozen (SIGSTOP) and resumed took tasks again: it came back, it did not just stay alive.
    Each entry: the worker's name and what it logged after SIGCONT."""
    return Check("a frozen worker came back: it ran tasks again after SIGCONT", len(thawed),
                 [f"{t['worker']} ran no task after SIGCONT" for t in thawed if " succeeded in " not in t["log_after"]])


def exercised_check(evidence: dict[str, int]) -> Check:
    """Each fault class happened at least once (else the run proves nothing about it)."""
    return Check("every fault class exercised at least once", len(evidence),
                 [f"{what}: none" for what, n in evidence.items() if not n])


def sagas_in_logs(paths, *, name: str, version: int) -> set[str]:
    """The ids of the sagas of `name` v`version` whose transitions these worker logs show (the
    engine logs each one: saga_transition saga=<id> name=<name> v=<version> ...)."""
    needle = f" name={name} v={version} "
    found = set()
    for path in paths:
        for line in Path(path).read_text(errors="replace").splitlines():
            if "saga_transition saga=" in line and needle in line:
                found.add(line.split("saga_transition saga=", 1)[1].split()[0])
    return found


def _stream_check() -> Check:
    """Every event published in the run, before the Redis restart as well as after it: the relay
    must have put back what the restart lost."""
    gaps = outbox_stream_gaps()
    return Check(
        "Redis stream: every event published (before and after the Redis restart) is in its stream",
        gaps["checked"],
        [f"event {event_id} is missing from its stream" for event_id in gaps["missing"]],
    )


def recovery_counts(order_ids) -> dict[str, int]:
    """What the faults cost and what absorbed them (not violations: evidence the faults bit)."""
    counts = saga_recovery_counts(SagaInstance.objects.filter(order__pk__in=order_ids))
    counts["duplicate consumer deliveries absorbed by the inbox"] = consumer_duplicates_absorbed()
    counts["charge calls repeated under one key (retries; the key makes them no second charge)"] = provider_repeated_calls()
    counts["repeated Redis stream entries (consumers dedupe by id)"] = outbox_stream_gaps()["repeated_entries"]
    streams = outbox_stream_recoveries()
    counts["Redis streams found to have lost entries (repaired by the relay)"] = streams["recoveries"]
    counts["events published again to a stream after a loss"] = streams["republished"]
    parked = ParkedDelivery.objects.all()
    counts["consumer deliveries given up once, parked and settled (pm_blackhole, choreographed)"] = parked.filter(settled=True).count()
    return counts
