"""An outage reaches a client as an outage (DESIGN.md rule 15): a JSON 503 with Retry-After,
never a 500 or a hang.

`outage_of(exc)` names the part that is not answering ("database", "cache", "broker") when an
exception means that part is unreachable, timed out or frozen, and None for anything else (a bug
stays a 500). It is used by the DRF exception handler (config.api) and, for everything outside
DRF (the admin, middleware, sessions), by `OutageMiddleware` with the `got_request_exception`
signal. Bounded waits (connect and socket timeouts, the query deadline of config.db_deadline) are
what turn a frozen component into such an exception quickly.
"""

from __future__ import annotations

import logging
import sys

from django.conf import settings
from django.core.signals import got_request_exception
from django.db import InterfaceError, OperationalError
from django.http import JsonResponse

log = logging.getLogger("chainsaga.outage")


def outage_of(exc: BaseException | None) -> str | None:
    """'database', 'cache' or 'broker' when `exc` (or what caused it) says that part is down."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        component = _component(exc)
        if component:
            return component
        exc = exc.__cause__ or exc.__context__
    return None


def _component(exc: BaseException) -> str | None:
    if isinstance(exc, (OperationalError, InterfaceError)):
        return "database"
    module = type(exc).__module__
    if module.startswith("redis"):
        from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

        return "cache" if isinstance(exc, (ConnectionError, TimeoutError, BusyLoadingError)) else None
    if module.startswith(("kombu", "amqp")):
        from kombu.exceptions import OperationalError as BrokerUnavailable

        return "broker" if isinstance(exc, (BrokerUnavailable, ConnectionError)) else None
    return None


def outage_response(component: str) -> JsonResponse:
    response = JsonResponse(
        {
            "detail": f"The service is temporarily unavailable ({component} not answering). Please try again shortly.",
            "code": "service_unavailable",
        },
        status=503,
    )
    response["Retry-After"] = str(settings.OUTAGE_RETRY_AFTER)
    return response


def log_outage(component: str, request, exc: BaseException) -> None:
    # One line, no traceback: during an outage every request fails the same way.
    log.warning("outage component=%s path=%s error=%s: %s", component, request.path, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")


class OutageMiddleware:
    """Outermost: a response Django turned into a 500 because a part of the system was down goes
    out as a JSON 503 with Retry-After. Django converts an exception into a response in the layer
    where it happens; `got_request_exception` (below) tells this middleware which part it was."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        component = getattr(request, "_outage", None)
        if component and response.status_code >= 500:
            return outage_response(component)
        return response


def _remember_outage(sender, request=None, **kwargs) -> None:
    exc = sys.exc_info()[1]
    component = outage_of(exc)
    if component and request is not None:
        request._outage = component
        log_outage(component, request, exc)


got_request_exception.connect(_remember_outage, dispatch_uid="config.outage")


class QuietOutageFilter(logging.Filter):
    """On django.request: an outage is logged once by log_outage, not as a 500 with a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return outage_of(exc) is None
