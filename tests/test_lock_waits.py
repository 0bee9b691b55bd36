"""Busy and frozen processes: every wait is bounded, and one stuck process does not stall the rest
(rule 15; issue 9, case 6)."""

import os
import signal
from decimal import Decimal

import pytest
from django.conf import settings

from sagas.models import SagaState, StepState
from sagas.testing import CeleryBeat, CeleryWorker, subprocess_environment, timeline, wait_for_saga
from tests.engine_helpers import step_row, wait_for_step_in_hand
from tests.sagaapp.models import Wallet
from tests.sagaapp.sagas import HOLD_QUEUE, gated, hold, transfer_quick, with_deadline

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.services(reason="a SQLite step transaction holds the database's one write lock while it runs: a long step blocks every writer, the sweeper too")
def test_deadlines_fire_on_time_while_every_step_process_is_busy(saga_worker, tmp_path):
    gate = tmp_path / "open"
    with CeleryWorker(queues=[settings.SAGAS_CONTROL_QUEUE], concurrency=1), CeleryBeat(
        env=subprocess_environment(SAGAS_SWEEP_INTERVAL="0.5")
    ):
        # Given every step process of the worker busy with a long step
        busy = [gated.start(input={"gate": {"reserve": str(gate)}}) for _ in range(2)]
        for saga in busy:
            wait_for_step_in_hand(saga_worker, saga.id, "reserve")

        # When a saga with a 2 s deadline waits behind them
        late = with_deadline.start(input={})

        # Then the sweeper, on its own queue and process, compensates it at its deadline anyway
        late = wait_for_saga(late.id, states=[SagaState.COMPENSATED], timeout=15)
        assert [step_row(saga.id, "reserve").state for saga in busy] == [StepState.PENDING] * 2, "still busy"
        assert late.failure_reason == "deadline exceeded"
        gate.touch()
        for saga in busy:
            assert wait_for_saga(saga.id).state == SagaState.COMPLETED


@pytest.mark.services(reason="PostgreSQL row locks and session timeouts")
def test_a_frozen_worker_holding_a_row_lock_neither_stalls_nor_spends_other_sagas_deliveries(saga_worker, tmp_path):
    wallet, target = Wallet.objects.create(balance=Decimal("100.00")), Wallet.objects.create(balance=Decimal("0.00"))
    frozen = CeleryWorker(queues=[HOLD_QUEUE], concurrency=1).start()
    try:
        # Given a worker frozen whole (SIGSTOP) inside a step transaction that locks the wallet
        holder = hold.start(input={"wallet": wallet.pk, "gate": {"hold": str(tmp_path / "never")}})
        frozen.wait_for_output(f"test_hold_wallet saga={holder.id} holds wallet {wallet.pk}")
        os.killpg(frozen.process.pid, signal.SIGSTOP)

        # When healthy sagas need the same row
        transfers = [
            transfer_quick.start(input={"source": wallet.pk, "target": target.pk, "amount": "10.00"}) for _ in range(2)
        ]

        # Then they complete once PostgreSQL ends the frozen session (the step's timeout + grace),
        # their lock waits retried without spending an attempt or a delivery
        for saga in transfers:
            saga = wait_for_saga(saga.id, timeout=45)
            assert saga.state == SagaState.COMPLETED, timeline(saga.id)
            debit = step_row(saga.id, "debit_source")
            assert (debit.attempts, debit.deliveries) == (1, 1), timeline(saga.id)
        wallet.refresh_from_db()
        assert wallet.balance == Decimal("80.00")
    finally:
        os.killpg(frozen.process.pid, signal.SIGCONT)
        frozen.kill()
