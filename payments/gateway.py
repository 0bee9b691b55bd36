"""The payment gateway adapter and a simulated provider that behaves like a real one.

The provider keeps its own ledger outside our database transaction (a SQLite file, standing in
for the provider's servers), so a charge it made survives our step rolling back: exactly the
situation a lost response creates. Charges and refunds are idempotent per key, as with real
providers, which is how a retried step reconciles instead of charging twice.

The order's payment method picks the behaviour:
    pm_ok                  succeeds
    pm_declined            PaymentDeclined (business failure, never retried)
    pm_insufficient_funds  InsufficientFunds (business failure)
    pm_flaky               GatewayUnavailable twice per key, then succeeds
    pm_timeout             charges, then GatewayTimeout (the response is lost); a retry finds the charge
    pm_blackhole           charges, and every response is lost: the step gives up with the charge made,
                           and only a refund that looks the charge up by key gives the money back
"""

from __future__ import annotations

import sqlite3
import uuid
from contextlib import closing
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from django.conf import settings

from sagas import BusinessError, TransientError

PAYMENT_METHODS = ("pm_ok", "pm_declined", "pm_insufficient_funds", "pm_flaky", "pm_timeout", "pm_blackhole")


class PaymentFailed(BusinessError):
    """The provider refused the charge for good."""


class PaymentDeclined(PaymentFailed):
    pass


class InsufficientFunds(PaymentFailed):
    pass


class GatewayError(TransientError):
    """The provider could not be reached or did not answer; the call may be retried with the same key."""


class GatewayUnavailable(GatewayError):
    pass


class GatewayTimeout(GatewayError):
    pass


@dataclass(frozen=True)
class ProviderCharge:
    reference: str
    amount: Decimal
    currency: str
    key: str = ""


@dataclass(frozen=True)
class ProviderRefund:
    reference: str
    charge_reference: str
    amount: Decimal
    key: str = ""


@dataclass(frozen=True)
class ProviderLedger:
    charges: list[ProviderCharge]
    refunds: list[ProviderRefund]
    calls: dict[str, int]  # charge calls per idempotency key


_SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (key TEXT PRIMARY KEY, reference TEXT NOT NULL, amount TEXT NOT NULL,
                                    currency TEXT NOT NULL, method TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS refunds (key TEXT PRIMARY KEY, reference TEXT NOT NULL, charge_reference TEXT NOT NULL,
                                    amount TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS calls (key TEXT PRIMARY KEY, count INTEGER NOT NULL);
"""


class SimulatedProvider:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def charge(self, *, key: str, amount: Decimal, currency: str, method: str) -> ProviderCharge:
        """Charge once per key. Raises PaymentDeclined, InsufficientFunds, GatewayUnavailable, GatewayTimeout."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            calls = self._count_call(db, key)
            row = db.execute("SELECT reference, amount, currency FROM charges WHERE key = ?", (key,)).fetchone()
            if row is not None:
                db.execute("COMMIT")
                if method == "pm_blackhole":
                    raise GatewayTimeout("no response from the provider within the timeout")
                return ProviderCharge(row[0], Decimal(row[1]), row[2])
            if method == "pm_declined":
                db.execute("COMMIT")
                raise PaymentDeclined("card declined by the issuer")
            if method == "pm_insufficient_funds":
                db.execute("COMMIT")
                raise InsufficientFunds("insufficient funds on the card")
            if method == "pm_flaky" and calls <= 2:
                db.execute("COMMIT")
                raise GatewayUnavailable(f"provider unavailable (call {calls})")
            if method not in PAYMENT_METHODS:
                db.execute("COMMIT")
                raise PaymentDeclined(f"unknown payment method {method}")
            reference = f"ch_{uuid.uuid4().hex[:16]}"
            db.execute(
                "INSERT INTO charges (key, reference, amount, currency, method) VALUES (?, ?, ?, ?, ?)",
                (key, reference, str(amount), currency, method),
            )
            db.execute("COMMIT")
        if (method == "pm_timeout" and calls == 1) or method == "pm_blackhole":
            raise GatewayTimeout("no response from the provider within the timeout")
        return ProviderCharge(reference, amount, currency)

    def find_charge(self, *, key: str) -> ProviderCharge | None:
        """The charge made with this idempotency key, if any (how a client reconciles a lost response)."""
        with closing(self._connect()) as db:
            row = db.execute("SELECT reference, amount, currency FROM charges WHERE key = ?", (key,)).fetchone()
        return ProviderCharge(row[0], Decimal(row[1]), row[2]) if row else None

    def refund(self, *, key: str, charge_reference: str, amount: Decimal) -> ProviderRefund:
        """Refund once per key."""
        with closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT reference, charge_reference, amount FROM refunds WHERE key = ?", (key,)).fetchone()
            if row is None:
                row = (f"re_{uuid.uuid4().hex[:16]}", charge_reference, str(amount))
                db.execute("INSERT INTO refunds (key, reference, charge_reference, amount) VALUES (?, ?, ?, ?)", (key, *row))
            db.execute("COMMIT")
        return ProviderRefund(row[0], row[1], Decimal(row[2]))

    def charges(self) -> dict[str, Decimal]:
        """Every charge the provider made, by key (for invariant checks)."""
        with closing(self._connect()) as db:
            return {key: Decimal(amount) for key, amount in db.execute("SELECT key, amount FROM charges")}

    def refunds(self) -> dict[str, Decimal]:
        with closing(self._connect()) as db:
            return {key: Decimal(amount) for key, amount in db.execute("SELECT charge_reference, amount FROM refunds")}

    def ledger(self) -> ProviderLedger:
        """Every charge and refund the provider made, and how often each key was called (for
        reconciliation and invariant checks)."""
        with closing(self._connect()) as db:
            charges = [ProviderCharge(ref, Decimal(amount), currency, key)
                       for key, ref, amount, currency in db.execute("SELECT key, reference, amount, currency FROM charges")]
            refunds = [ProviderRefund(ref, charge_ref, Decimal(amount), key)
                       for key, ref, charge_ref, amount in db.execute("SELECT key, reference, charge_reference, amount FROM refunds")]
            calls = dict(db.execute("SELECT key, count FROM calls"))
        return ProviderLedger(charges=charges, refunds=refunds, calls=calls)

    def reset(self) -> None:
        with closing(self._connect()) as db:
            db.executescript("DELETE FROM charges; DELETE FROM refunds; DELETE FROM calls;")

    @staticmethod
    def _count_call(db: sqlite3.Connection, key: str) -> int:
        db.execute("INSERT INTO calls (key, count) VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET count = count + 1", (key,))
        return db.execute("SELECT count FROM calls WHERE key = ?", (key,)).fetchone()[0]


def gateway() -> SimulatedProvider:
    return SimulatedProvider(settings.PAYMENTS_PROVIDER_PATH)
