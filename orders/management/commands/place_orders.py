"""Place many orders through the same service as the API, wait for their sagas, report."""

import logging
import random
import time
import uuid

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from tqdm import tqdm

from inventory.models import Product
from orders.models import Flow, Order, OrderStatus
from orders.selectors import order_outcomes, shop_invariant_violations
from orders.services import SUPPORTED_FLOWS, LineRequest, order_place
from sagas.models import TERMINAL_STATES, SagaInstance

DEFAULT_MIX = "ok=70,declined=10,insufficient_funds=5,flaky=10,timeout=5"


def parse_mix(text: str) -> dict[str, int]:
    """'ok=70,declined=10' -> {'pm_ok': 70, 'pm_declined': 10}. Raises ValueError."""
    from payments.gateway import PAYMENT_METHODS

    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        method = f"pm_{name.strip()}"
        if method not in PAYMENT_METHODS:
            raise ValueError(f"unknown payment method {name.strip()!r}; use {', '.join(m[3:] for m in PAYMENT_METHODS)}")
        if not weight.strip().isdigit():
            raise ValueError(f"weight of {name.strip()!r} must be a whole number")
        mix[method] = int(weight)
    if not any(mix.values()):
        raise ValueError("the mix needs at least one positive weight")
    return mix


class Command(BaseCommand):
    help = "Place N orders with a mix of payment methods, wait for every saga, print outcomes and check invariants."

    def add_arguments(self, parser):
        parser.add_argument("--count", type=int, default=100)
        parser.add_argument("--mix", default=DEFAULT_MIX, help=f"payment methods and weights (default {DEFAULT_MIX})")
        parser.add_argument("--flow", choices=SUPPORTED_FLOWS, default=Flow.ORCHESTRATED)
        parser.add_argument("--user", default="demo", help="the customer placing the orders (see seed_demo)")
        parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the sagas")
        parser.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable run")

    def handle(self, *args, count, mix, flow, user, timeout, seed, verbosity, **options):
        if verbosity < 2:
            logging.getLogger("sagas").setLevel(logging.WARNING)  # one line per saga would hide the progress
        if count < 1:
            raise CommandError("--count must be at least 1")
        try:
            weights = parse_mix(mix)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        try:
            owner = get_user_model().objects.get(username=user)
        except get_user_model().DoesNotExist:
            raise CommandError(f"no user {user!r}; run `python manage.py seed_demo` first") from None
        skus = list(Product.objects.values_list("sku", flat=True))
        if not skus:
            raise CommandError("no products; run `python manage.py seed_demo` first")
        rng = random.Random(seed)
        methods, method_weights = zip(*weights.items())
        run = uuid.uuid4().hex[:8]

        order_ids = []
        for n in tqdm(range(count), desc="placing", unit="order", disable=None):
            lines = [LineRequest(sku, rng.randint(1, 3)) for sku in rng.sample(skus, rng.randint(1, min(3, len(skus))))]
            method = rng.choices(methods, method_weights)[0]
            result = order_place(owner=owner, lines=lines, payment_method=method, flow=flow, idempotency_key=f"place-orders-{run}-{n}")
            order_ids.append(result.order.pk)

        finished = self._wait(order_ids, timeout)
        outcomes = order_outcomes(order_ids)
        self._report(outcomes, count)
        violations = shop_invariant_violations(Order.objects.filter(pk__in=order_ids))
        self.stdout.write("invariants: " + ("all hold" if not violations else f"{len(violations)} violated"))
        for violation in violations:
            self.stdout.write(f"  - {violation}")
        unsettled = Order.objects.filter(pk__in=order_ids, status=OrderStatus.PENDING).count()
        running = SagaInstance.objects.filter(order__in=order_ids).exclude(state__in=TERMINAL_STATES).count()
        if not finished or unsettled or running:
            raise CommandError(
                f"after {timeout:g}s {unsettled} orders are still pending and {running} sagas running (is a worker up?)"
            )
        if violations:
            raise CommandError("invariants violated")

    def _wait(self, order_ids, timeout: float) -> bool:
        """Until every order is settled (and every saga terminal); False on timeout."""
        deadline = time.monotonic() + timeout
        with tqdm(total=len(order_ids), desc="orders settled", unit="order", disable=None) as bar:
            while True:
                settled = Order.objects.filter(pk__in=order_ids).exclude(status=OrderStatus.PENDING).count()
                running = SagaInstance.objects.filter(order__in=order_ids).exclude(state__in=TERMINAL_STATES).exists()
                bar.update(settled - bar.n)
                if settled == len(order_ids) and not running:
                    return True
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.5)

    def _report(self, outcomes: dict, count: int) -> None:
        self.stdout.write("")
        self.stdout.write(f"{'orders by status':<24}{'count':>8}")
        for status, n in sorted(outcomes["orders"].items()):
            self.stdout.write(f"  {status:<22}{n:>8}")
        self.stdout.write(f"{'sagas by state':<24}{'count':>8}")
        if not outcomes["sagas"]:
            self.stdout.write("  (none: the choreographed flow has no orchestrating saga)")
        for state, n in sorted(outcomes["sagas"].items()):
            self.stdout.write(f"  {state:<22}{n:>8}")
        if outcomes["median_s"] is not None:
            self.stdout.write(
                f"placed -> settled: median {outcomes['median_s']:.3f}s, p95 {outcomes['p95_s']:.3f}s ({count} orders)"
            )
