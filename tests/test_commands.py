"""The demo commands: seed_demo and place_orders, against a real worker."""

from io import StringIO

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from inventory.models import Product, Stock
from orders.models import Order, OrderStatus
from payments.gateway import SimulatedProvider
from sagas.models import TERMINAL_STATES, SagaInstance


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_seed_demo_creates_the_catalogue_and_users_once_and_prints_credentials():
    first = run("seed_demo")
    Stock.objects.update(on_hand=7)

    second = run("seed_demo")

    assert "demo (password demo-password)" in first and "admin (password admin-password)" in first
    assert "existing user, password unchanged" in second
    assert Product.objects.count() == 6
    assert set(Stock.objects.values_list("on_hand", flat=True)) == {7}, "a second run leaves stock alone"
    assert get_user_model().objects.get(username="admin").is_staff
    assert get_user_model().objects.get(username="demo").check_password("demo-password")


@pytest.mark.django_db
def test_seed_demo_refuses_demo_users_under_production_settings_unless_forced(settings):
    settings.DEMO_SEED_ALLOWED = False  # as config.settings.production sets it (tests/test_deployment.py)

    with pytest.raises(CommandError, match="production"):
        run("seed_demo")
    seeded_when_refused = (get_user_model().objects.count(), Product.objects.count())
    forced = run("seed_demo", "--force")

    assert seeded_when_refused == (0, 0)
    assert "admin (password admin-password)" in forced


@pytest.mark.django_db(transaction=True)
def test_place_orders_waits_for_every_saga_and_reports_outcomes_with_invariants(saga_worker):
    SimulatedProvider(settings.PAYMENTS_PROVIDER_PATH).reset()
    run("seed_demo")

    output = run("place_orders", "--count", "20", "--seed", "7", "--timeout", "120")

    assert Order.objects.count() == 20
    assert SagaInstance.objects.exclude(state__in=TERMINAL_STATES).count() == 0
    assert Order.objects.filter(status=OrderStatus.PENDING).count() == 0
    assert "orders by status" in output and "sagas by state" in output
    assert "placed -> settled: median" in output
    assert "invariants: all hold" in output


@pytest.mark.django_db
@pytest.mark.parametrize("mix", ["ok=70,bogus=5", "ok=x", "ok=0"])
def test_place_orders_refuses_a_bad_mix(mix):
    run("seed_demo")

    with pytest.raises(CommandError):
        run("place_orders", "--count", "1", "--mix", mix)

    assert Order.objects.count() == 0
