"""The README's "Defining a saga" example, run for real (the README shows this file)."""

import re
from decimal import Decimal
from pathlib import Path

import pytest

from sagas.testing import inject_fault, wait_for_saga
from tests.sagaapp.models import Wallet
from tests.sagaapp.sagas import transfer

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.django_db(transaction=True)
def test_a_transfer_moves_the_money(saga_worker):
    alice, bob = Wallet.objects.create(balance="100.00"), Wallet.objects.create(balance="0.00")

    saga = transfer.start(input={"source": alice.pk, "target": bob.pk, "amount": "30.00"})

    assert wait_for_saga(saga.id).state == "COMPLETED"
    alice.refresh_from_db(), bob.refresh_from_db()
    assert (alice.balance, bob.balance) == (Decimal("70.00"), Decimal("30.00"))


@pytest.mark.django_db(transaction=True)
def test_a_failed_credit_gives_the_money_back(saga_worker):
    alice, bob = Wallet.objects.create(balance="100.00"), Wallet.objects.create(balance="0.00")
    inject_fault("transfer", "credit_target", kind="business")

    saga = transfer.start(input={"source": alice.pk, "target": bob.pk, "amount": "30.00"})

    assert wait_for_saga(saga.id).state == "COMPENSATED"
    alice.refresh_from_db(), bob.refresh_from_db()
    assert (alice.balance, bob.balance) == (Decimal("100.00"), Decimal("0.00"))


@pytest.mark.django_db(transaction=True)
def test_a_transfer_beyond_the_balance_fails_without_retrying(saga_worker):
    alice, bob = Wallet.objects.create(balance="10.00"), Wallet.objects.create(balance="0.00")

    saga = transfer.start(input={"source": alice.pk, "target": bob.pk, "amount": "30.00"})

    saga = wait_for_saga(saga.id)
    assert saga.state == "COMPENSATED"
    assert "InsufficientFunds" in saga.failure_reason
    assert saga.steps.get(name="debit_source").attempts == 1


def test_the_readme_shows_the_code_that_these_tests_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    sources = (Path(__file__).read_text(), (Path(__file__).parent / "sagaapp" / "sagas.py").read_text())

    shown = [b for b in blocks if "transfer" in b and "def " in b]

    assert len(shown) >= 2, "README's 'Defining a saga' section lost its example"
    for block in shown:
        assert any(block.strip() in source for source in sources), f"README block is not in the code:\n{block}"
