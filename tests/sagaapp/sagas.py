"""Test sagas: every step records an Effect row in its own transaction, so a test can count how
often each step and compensation took effect. `input["sleep"][step]` makes a step slow."""

import os
import time
from datetime import timedelta

from sagas import Retry, Saga, Step, StepContext
from tests.sagaapp.models import Effect

FAST_RETRY = Retry(max_attempts=3, initial_delay=0.1, max_delay=0.5)
COMPENSATION_RETRY = Retry(max_attempts=3, initial_delay=0.1, max_delay=0.5)
STEP_NAMES = ["reserve", "charge", "ship", "notify"]


def wait_for_gate(ctx: StepContext) -> None:
    """`input["gate"][step]`: a file path; the step waits (at most its timeout) until it exists."""
    gate = ctx.input.get("gate", {}).get(ctx.step)
    deadline = time.monotonic() + 60
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)


def record(ctx: StepContext) -> dict:
    time.sleep(ctx.input.get("sleep", {}).get(ctx.step, 0))
    wait_for_gate(ctx)
    Effect.objects.create(saga_id=ctx.saga_id, step=ctx.step, direction=ctx.direction, pid=os.getpid())
    return {"step": ctx.step, "key": ctx.idempotency_key, "attempt": ctx.attempt}


def steps(timeout: float = 5.0) -> list[Step]:
    return [
        Step(
            name,
            action=record,
            # the last step has nothing to undo, like "notify fulfillment"
            compensation=record if name != "notify" else None,
            retry=FAST_RETRY,
            compensation_retry=COMPENSATION_RETRY,
            timeout=timeout,
            max_deliveries=2,
        )
        for name in STEP_NAMES
    ]


four_steps = Saga("test_four_steps", version=1, steps=steps())
parallel = Saga("test_parallel", version=1, steps=steps(), compensate_in_parallel=True)
keep_going = Saga("test_keep_going", version=1, steps=steps(), continue_on_compensation_failure=True)
with_deadline = Saga("test_deadline", version=1, steps=steps(), deadline=timedelta(seconds=2))

gated = Saga("test_gated", version=1, steps=steps(timeout=30.0))  # its steps may wait on a gate for long

# The same name in two versions: a saga finishes with the version it started with.
versioned_v1 = Saga("test_versioned", version=1, steps=steps()[:2])
versioned_v2 = Saga("test_versioned", version=2, steps=steps())


# --- the README's "Defining a saga" example ------------------------------------------------
from decimal import Decimal  # noqa: E402

from django.db.models import F  # noqa: E402

from sagas import BusinessError  # noqa: E402
from tests.sagaapp.models import Wallet  # noqa: E402


class InsufficientFunds(BusinessError):
    pass


def debit(ctx):
    wallet = Wallet.objects.select_for_update().get(pk=ctx.input["source"])
    amount = Decimal(ctx.input["amount"])
    if wallet.balance < amount:
        raise InsufficientFunds(f"wallet {wallet.pk} holds {wallet.balance}, needs {amount}")
    wallet.balance -= amount
    wallet.save(update_fields=["balance"])


def credit_back(ctx):
    Wallet.objects.filter(pk=ctx.input["source"]).update(balance=F("balance") + Decimal(ctx.input["amount"]))


def credit(ctx):
    Wallet.objects.filter(pk=ctx.input["target"]).update(balance=F("balance") + Decimal(ctx.input["amount"]))


transfer = Saga("transfer", version=1, steps=[
    Step("debit_source", action=debit, compensation=credit_back),
    Step("credit_target", action=credit, retry=Retry(max_attempts=5, max_delay=10)),
])


# --- lock waits: a step that holds a wallet's row lock, on a queue of its own -------------------
import logging  # noqa: E402

from django.conf import settings  # noqa: E402

HOLD_QUEUE = f"{settings.CELERY_TASK_DEFAULT_QUEUE}-hold"


def hold_wallet(ctx):
    Wallet.objects.select_for_update().get(pk=ctx.input["wallet"])
    logging.getLogger("tests").warning("test_hold_wallet saga=%s holds wallet %s", ctx.saga_id, ctx.input["wallet"])
    wait_for_gate(ctx)


hold = Saga("test_hold_wallet", version=1, steps=[Step("hold", action=hold_wallet, queue=HOLD_QUEUE, timeout=6.0, retry=FAST_RETRY)])
# The README's transfer with short step timeouts: its lock waits are bounded at a third of that.
transfer_quick = Saga("test_transfer_quick", version=1, steps=[
    Step("debit_source", action=debit, compensation=credit_back, timeout=6.0),
    Step("credit_target", action=credit, timeout=6.0),
])


# --- what a saga author gets: the reason in a compensation, the outcome in on_finish ---------------
class CardDeclined(BusinessError):
    pass


def undo_and_tell_why(ctx: StepContext) -> dict:
    Effect.objects.create(saga_id=ctx.saga_id, step=ctx.step, direction=ctx.direction, pid=os.getpid())
    return {"failed_step": ctx.reason.step, "refusal": ctx.reason.refusal, "reason": ctx.reason.reason}


def decline(ctx: StepContext) -> None:
    raise CardDeclined("card declined by the issuer")


def return_a_set(ctx: StepContext) -> set:
    return {1, 2}


def note_outcome(outcome) -> None:
    Effect.objects.create(
        saga_id=outcome.saga_id, step=f"on_finish:{outcome.state}", direction=outcome.failure.step if outcome.failure else "-", pid=os.getpid()
    )


declined = Saga("test_declined", version=1, on_finish=note_outcome, steps=[
    Step("reserve", action=record, compensation=undo_and_tell_why, retry=FAST_RETRY, compensation_retry=COMPENSATION_RETRY),
    Step("pay", action=decline, retry=FAST_RETRY),
])
not_json = Saga("test_not_json", version=1, on_finish=note_outcome, steps=[
    Step("reserve", action=record, compensation=undo_and_tell_why, retry=FAST_RETRY, compensation_retry=COMPENSATION_RETRY),
    Step("strange", action=return_a_set, retry=FAST_RETRY),
])
