"""When a delivery is counted against its budget: a step's (sagas.runner) and a consumer's
(sagas.consumers) alike.

A delivery is counted so that work that kills its worker every time is given up on instead of
looping. Counting it in its own committed transaction before the work costs a commit per
delivery; counting it with its outcome costs nothing, but a delivery that died leaves no trace.
So a delivery is counted before the work only when the one before it may have died: the broker
flags it as delivered again, the engine's own sweep re-sent it, or the transport cannot flag.
"""

from __future__ import annotations

import enum
import functools

# Transports that flag a message they deliver again: kombu's Redis transport (and Sentinel) when
# it restores an unacknowledged message (a worker lost, the visibility timeout passed), AMQP
# brokers when they requeue one. Over any other transport (the embedded SQLAlchemy one) every
# delivery is counted before it runs.
_FLAGGING_TRANSPORTS = frozenset({"redis", "rediss", "sentinel", "amqp", "amqps", "pyamqp", "librabbitmq"})


class Counting(enum.Enum):
    IN_STEP = "in_step"  # with the outcome, in the work's own transaction: a first delivery
    BEFORE = "before"  # committed before the work: re-sent by a sweep, or the transport cannot flag
    AFTER_DEATH = "after_death"  # the broker delivers again: count the previous delivery's death too, then this one

    @classmethod
    def for_message(cls, *, broker_url: str, redelivered: bool, resent: bool) -> Counting:
        """`redelivered`: the broker's flag on this message; `resent`: the engine's sweep sent it
        again (the previous message may have died with its worker)."""
        if not transport_flags_redelivery(broker_url):
            return cls.BEFORE
        if redelivered:
            return cls.AFTER_DEATH
        return cls.BEFORE if resent else cls.IN_STEP

    @property
    def counts_first(self) -> bool:
        return self is not Counting.IN_STEP

    @property
    def deaths(self) -> int:
        """Deaths the broker tells of, to count with this delivery unless counted already."""
        return 1 if self is Counting.AFTER_DEATH else 0


@functools.cache
def transport_flags_redelivery(broker_url: str) -> bool:
    first = broker_url.split(";")[0]  # a failover list: its transports are alike
    return first.partition("://")[0].lower() in _FLAGGING_TRANSPORTS
