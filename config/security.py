"""Who is asking, and what a password guesser gets.

One rule names the client's address for the API's throttles and for django-axes' login lockout,
so a client cannot count against one budget under one address and another under a second:
REMOTE_ADDR, or, behind NUM_PROXIES trusted proxies that each append the address they saw to
X-Forwarded-For, the NUM_PROXIES-th address from the right of that header. Everything left of
it was written by the client and is ignored.
"""

from __future__ import annotations

import ipaddress
import logging

from axes.helpers import get_cool_off, get_lockout_message
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from rest_framework import throttling
from rest_framework.exceptions import Throttled

from config.throttle_cache import throttle_cache

log = logging.getLogger("chainsaga.security")


def client_address(request: HttpRequest) -> str:
    """The client's IP address under the NUM_PROXIES rule (DRF's, so stock DRF throttles agree).

    A forwarded entry that is not an IP address (a miscounted NUM_PROXIES lets the client write
    it) falls back to REMOTE_ADDR: axes stores the address in an inet column."""
    remote_addr = request.META.get("REMOTE_ADDR", "")
    forwarded_for = request.META.get("HTTP_X_FORWARDED_FOR")
    proxies = settings.NUM_PROXIES
    if proxies == 0 or forwarded_for is None:
        return remote_addr
    addresses = forwarded_for.split(",")
    candidate = addresses[-min(proxies, len(addresses))].strip()
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        log.warning("X-Forwarded-For entry %r is not an IP address; using the peer address %s", candidate[:64], remote_addr)
        return remote_addr


class ClientAddressMixin:
    """DRF throttles identify anonymous callers by `client_address`."""

    def get_ident(self, request) -> str:
        return client_address(request)


class AnonRateThrottle(ClientAddressMixin, throttling.AnonRateThrottle):
    cache = throttle_cache  # fails open to local counters while the cache is down


class UserRateThrottle(ClientAddressMixin, throttling.UserRateThrottle):
    cache = throttle_cache


def lockout_seconds() -> int:
    """How long a lockout lasts after the latest failed attempt (each one restarts the cool-off)."""
    return int(get_cool_off().total_seconds())


class LoginLockedOut(Throttled):
    default_detail = "Too many failed login attempts for this username or from this address; login is locked."
    default_code = "login_locked_out"

    def __init__(self) -> None:
        super().__init__(wait=lockout_seconds())


def is_locked_out(request) -> bool:
    """Whether axes refused (or just locked out) the login attempted with this request."""
    return bool(getattr(request, "axes_locked_out", False))


def lockout_response(request: HttpRequest, original_response=None, credentials=None) -> HttpResponse:
    """AXES_LOCKOUT_CALLABLE: axes' own answer to a locked-out login (its message, 429) with a
    Retry-After. The token endpoint answers for itself (LoginLockedOut, JSON)."""
    response = HttpResponse(get_lockout_message(), status=429, content_type="text/plain; charset=utf-8")
    response["Retry-After"] = str(lockout_seconds())
    return response
