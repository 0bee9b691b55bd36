"""Password guessing: the token endpoint and the admin login are locked out per username and per
client address (django-axes), the API's throttles count per client address, and the client
address is taken from a configured number of trusted proxies, never from what a client claims.

Every test counts throttle hits in a cache of its own (not the shared Redis); axes records
failures in the database, which each test rolls back."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from axes.models import AccessAttempt
from axes.helpers import get_client_ip_address
from django.test import Client
from rest_framework.settings import api_settings
from rest_framework.test import APIClient
from rest_framework.throttling import AnonRateThrottle, SimpleRateThrottle

from config.security import client_address
from tests.orders_helpers import a_user
from tests.test_orders_api import api_as

TOKEN = "/api/auth/token/"
ADMIN_LOGIN = "/admin/login/"
LIMIT = 5  # failures before a lockout, in these tests


@pytest.fixture
def throttle_rates(settings, monkeypatch):
    """Throttle counters in a cache of this test's own; returns a function that sets the rates."""
    settings.CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": f"throttle-{uuid.uuid4()}"}
    }

    def set_rates(anon: str, user: str = "1000/min") -> None:
        rates = {"anon": anon, "user": user}
        settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}
        monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", rates)  # read once, at import

    set_rates("1000/min")
    return set_rates


@pytest.fixture
def login_limit(settings, throttle_rates):
    """Axes locks out after LIMIT failures; the API's own rate is high enough not to interfere."""
    settings.AXES_FAILURE_LIMIT = LIMIT
    return LIMIT


@pytest.fixture
def trusted_proxies(settings):
    """Set how many proxies in front of the app append to X-Forwarded-For (NUM_PROXIES)."""

    def set_proxies(count: int) -> None:
        settings.NUM_PROXIES = count
        settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": count}

    return set_proxies


def alice_with_password(password: str = "s3cret-pass"):
    user = a_user("alice", staff=True)
    user.set_password(password)
    user.save()
    return user


def guess(client, password: str, *, username: str = "alice", **headers):
    return client.post(TOKEN, {"username": username, "password": password}, format="json", headers=headers)


# --- the token endpoint ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_80_wrong_passwords_each_from_a_new_x_forwarded_for_are_locked_out_after_the_limit(login_limit):
    alice_with_password()

    statuses = [guess(APIClient(), f"guess-{n}", **{"X-Forwarded-For": f"203.0.113.{n}"}).status_code for n in range(80)]

    assert statuses[: LIMIT - 1] == [400] * (LIMIT - 1)
    assert statuses[LIMIT - 1 :] == [429] * (80 - LIMIT + 1)


@pytest.mark.django_db
def test_80_wrong_passwords_sent_with_a_valid_token_in_authorization_are_locked_out_after_the_limit(login_limit):
    alice_with_password()
    mallory = api_as(a_user("mallory"))  # any valid token used to exempt the caller from the anon throttle

    statuses = [guess(mallory, f"guess-{n}").status_code for n in range(80)]

    assert statuses[: LIMIT - 1] == [400] * (LIMIT - 1)
    assert statuses[LIMIT - 1 :] == [429] * (80 - LIMIT + 1)


@pytest.mark.django_db
def test_the_anon_rate_counts_per_client_address_whatever_x_forwarded_for_says(throttle_rates):
    throttle_rates("3/min")
    alice_with_password()

    statuses = [guess(APIClient(), f"guess-{n}", **{"X-Forwarded-For": f"203.0.113.{n}"}).status_code for n in range(4)]

    assert statuses == [400, 400, 400, 429]


@pytest.mark.django_db
def test_a_valid_token_in_authorization_does_not_lift_the_token_endpoints_anon_rate(throttle_rates):
    throttle_rates("3/min")
    alice_with_password()
    mallory = api_as(a_user("mallory"))

    statuses = [guess(mallory, f"guess-{n}").status_code for n in range(4)]

    assert statuses == [400, 400, 400, 429]


@pytest.mark.django_db
def test_a_locked_out_login_gets_a_json_429_saying_why_and_when_to_come_back(login_limit, settings):
    alice_with_password()
    for n in range(LIMIT - 1):
        guess(APIClient(), f"guess-{n}")

    response = guess(APIClient(), "guess-last")

    assert response.status_code == 429
    assert response["Content-Type"] == "application/json"
    assert "too many failed login attempts" in response.json()["detail"].lower()
    assert int(response["Retry-After"]) == int(settings.AXES_COOLOFF_TIME.total_seconds())
    assert "token" not in response.json()


@pytest.mark.django_db
def test_a_locked_out_username_is_refused_even_with_the_right_password_from_another_address(login_limit, trusted_proxies):
    trusted_proxies(1)
    alice_with_password("s3cret-pass")
    for n in range(LIMIT):
        guess(APIClient(), f"guess-{n}", **{"X-Forwarded-For": f"203.0.113.{n}"})

    response = guess(APIClient(), "s3cret-pass", **{"X-Forwarded-For": "198.51.100.9"})

    assert response.status_code == 429, response.content
    assert "token" not in response.json()


@pytest.mark.django_db
def test_a_locked_out_address_is_refused_for_every_username_while_other_addresses_log_in(login_limit, trusted_proxies):
    trusted_proxies(1)
    alice_with_password("s3cret-pass")
    attacker = {"X-Forwarded-For": "203.0.113.66"}
    for n in range(LIMIT):
        guess(APIClient(), "whatever", username=f"user-{n}", **attacker)

    from_attacker = guess(APIClient(), "s3cret-pass", **attacker)
    from_elsewhere = guess(APIClient(), "s3cret-pass", **{"X-Forwarded-For": "198.51.100.9"})

    assert from_attacker.status_code == 429
    assert from_elsewhere.status_code == 200, from_elsewhere.content
    assert "token" in from_elsewhere.json()


@pytest.mark.django_db
def test_the_right_password_below_the_limit_still_gets_a_token(login_limit):
    alice_with_password("s3cret-pass")
    for n in range(LIMIT - 2):
        guess(APIClient(), f"guess-{n}")

    response = guess(APIClient(), "s3cret-pass")

    assert response.status_code == 200, response.content


# --- the admin login ------------------------------------------------------------------------------


def admin_guess(client, password: str, *, username: str = "alice", **headers):
    return client.post(ADMIN_LOGIN, {"username": username, "password": password, "next": "/admin/"}, headers=headers)


@pytest.mark.django_db
def test_80_wrong_passwords_on_the_admin_login_are_locked_out_after_the_limit(login_limit, settings):
    alice_with_password()

    responses = [admin_guess(Client(), f"guess-{n}", **{"X-Forwarded-For": f"203.0.113.{n}"}) for n in range(80)]

    statuses = [r.status_code for r in responses]
    assert statuses[: LIMIT - 1] == [200] * (LIMIT - 1)
    assert statuses[LIMIT - 1 :] == [429] * (80 - LIMIT + 1)
    assert "too many login attempts" in responses[-1].content.decode().lower()
    assert int(responses[-1]["Retry-After"]) == int(settings.AXES_COOLOFF_TIME.total_seconds())


@pytest.mark.django_db
def test_a_username_locked_out_through_the_api_cannot_log_in_to_the_admin(login_limit):
    alice_with_password("s3cret-pass")
    for n in range(LIMIT):
        guess(APIClient(), f"guess-{n}")

    response = admin_guess(Client(), "s3cret-pass")

    assert response.status_code == 429


@pytest.mark.django_db
def test_the_admin_login_with_the_right_password_below_the_limit_logs_in(login_limit):
    alice_with_password("s3cret-pass")
    admin_guess(Client(), "guess-0")
    client = Client()

    response = admin_guess(client, "s3cret-pass")

    assert response.status_code == 302
    assert response["Location"] == "/admin/"


# --- what axes records ---------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("header, value", [("User-Agent", "probe\x00"), ("Accept", "application/json, text/probe\x00")])
def test_a_nul_byte_in_a_header_is_refused_before_any_password_check_not_a_500(login_limit, header, value):
    # config.middleware refuses the request first: no password is checked, so it is no oracle
    # for a guesser, and axes (which stores these headers) never sees it.
    alice_with_password()
    headers = {header: value}

    api = [guess(APIClient(), f"guess-{n}", **headers) for n in range(LIMIT)]
    admin = admin_guess(Client(), "guess-admin", **headers)

    assert [r.status_code for r in api] == [400] * LIMIT and admin.status_code == 400
    assert all("control character" in r.json()["detail"] for r in api)
    assert not AccessAttempt.objects.exists()


@pytest.mark.django_db
def test_a_username_with_a_nul_byte_is_a_400_before_any_lookup(login_limit):
    alice_with_password()

    response = guess(APIClient(), "whatever", username="al\x00ice")

    assert response.status_code == 400


# --- the client address ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "proxies, forwarded_for, expected",
    [
        (0, None, "192.0.2.1"),
        (0, "203.0.113.7", "192.0.2.1"),  # no trusted proxy: the header is the client's to invent
        (0, "203.0.113.7, 198.51.100.2", "192.0.2.1"),
        (1, None, "192.0.2.1"),
        (1, "203.0.113.7", "203.0.113.7"),
        (1, "10.9.9.9, 203.0.113.7", "203.0.113.7"),  # the left part was sent by the client
        (2, "10.9.9.9, 203.0.113.7, 198.51.100.2", "203.0.113.7"),
        (2, "203.0.113.7", "203.0.113.7"),  # fewer entries than proxies: the leftmost, as DRF does
        (1, "2001:db8::7", "2001:db8::7"),
    ],
)
def test_drf_throttles_and_axes_see_the_same_client_address(trusted_proxies, proxies, forwarded_for, expected):
    trusted_proxies(proxies)
    meta = {"REMOTE_ADDR": "192.0.2.1"}
    if forwarded_for is not None:
        meta["HTTP_X_FORWARDED_FOR"] = forwarded_for
    request = APIClient().get("/", **meta).wsgi_request

    assert api_settings.NUM_PROXIES == proxies
    assert client_address(request) == expected
    assert AnonRateThrottle().get_ident(request) == expected
    assert get_client_ip_address(request) == expected


@pytest.mark.parametrize("forwarded_for", ["not-an-address", "203.0.113.7:4431", ""])
def test_a_forwarded_address_that_is_not_an_ip_falls_back_to_the_peer_address(trusted_proxies, forwarded_for):
    # A miscounted NUM_PROXIES must not let a client write garbage into axes' inet column.
    trusted_proxies(1)
    request = APIClient().get("/", REMOTE_ADDR="192.0.2.1", HTTP_X_FORWARDED_FOR=forwarded_for).wsgi_request

    assert client_address(request) == "192.0.2.1"
    assert get_client_ip_address(request) == "192.0.2.1"


@pytest.mark.django_db
def test_the_token_endpoint_authenticates_no_one_so_a_bad_token_is_not_a_401(login_limit):
    alice_with_password("s3cret-pass")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")

    response = guess(client, "s3cret-pass")

    assert response.status_code == 200, response.content


def _settings_as_configured(tmp_path, **env: str) -> subprocess.CompletedProcess:
    show = (
        "import django; django.setup(); from django.conf import settings; "
        "from rest_framework.settings import api_settings; "
        "print(settings.NUM_PROXIES, api_settings.NUM_PROXIES, settings.AXES_CLIENT_IP_CALLABLE)"
    )
    clean = {key: value for key, value in os.environ.items() if key not in {"NUM_PROXIES", "DJANGO_SETTINGS_MODULE"}}
    return subprocess.run(
        [sys.executable, "-c", show],
        cwd=Path(__file__).resolve().parent.parent,
        env={**clean, "DJANGO_SETTINGS_MODULE": "config.settings.local", "CHAINSAGA_VAR_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("env, shown", [({}, "0 0"), ({"NUM_PROXIES": "2"}, "2 2")])
def test_num_proxies_from_the_environment_reaches_drf_and_axes(tmp_path, env, shown):
    result = _settings_as_configured(tmp_path, **env)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [*shown.split(), "config.security.client_address"]


def test_a_negative_num_proxies_is_refused_at_start_up(tmp_path):
    result = _settings_as_configured(tmp_path, NUM_PROXIES="-1")

    assert result.returncode != 0
    assert "ImproperlyConfigured: NUM_PROXIES=-1 must be 0 or more" in result.stderr
