"""API plumbing shared by every app: the error format, health, and the URL map."""

import logging

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import DatabaseError, connection
from drf_spectacular.utils import extend_schema, inline_serializer
from kombu.exceptions import OperationalError as BrokerError
from kombu.transport.virtual import Transport as VirtualTransport
from rest_framework import serializers, status
from rest_framework.exceptions import ValidationError
from django.http import JsonResponse
from django.views.defaults import page_not_found
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.parsers import FormParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler

from config.parsers import StrictJSONParser
from config.security import AnonRateThrottle, LoginLockedOut, is_locked_out

log = logging.getLogger("chainsaga.api")


def exception_handler(exc, context):
    """DRF's handler; anything it does not know becomes a logged JSON 500, never an HTML page."""
    response = drf_exception_handler(exc, context)
    if response is None:
        response = _client_error(exc)
    if response is None:
        log.exception("unhandled error in %s", context.get("view").__class__.__name__, exc_info=exc)
        return Response({"detail": "internal error; it has been logged"}, status=status.HTTP_500_INTERNAL_SERVER_ERROR)
    return response


def _client_error(exc) -> Response | None:
    """What Django raises for a request it refuses to read (body over DATA_UPLOAD_MAX_MEMORY_SIZE,
    too many fields, ...): the client's fault, so a 4xx, never a 500."""
    if isinstance(exc, RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        detail = f"the request body is larger than the {limit} bytes this API accepts"
        return Response({"detail": detail}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    if isinstance(exc, SuspiciousOperation):
        return Response({"detail": f"the request was refused: {exc}"}, status=status.HTTP_400_BAD_REQUEST)
    return None


class HealthApi(APIView):
    """200 when the database and the broker answer; 503 naming the part that does not."""

    permission_classes = [AllowAny]
    authentication_classes = []
    throttle_classes = []

    @extend_schema(
        responses={
            200: inline_serializer(
                "Health",
                {"database": serializers.CharField(), "broker": serializers.CharField(), "outbox": serializers.DictField()},
            )
        }
    )
    def get(self, request):
        checks = {"database": _check_database(), "broker": _check_broker()}
        healthy = all(value == "ok" for value in checks.values())
        body = {**checks, "outbox": _outbox() if checks["database"] == "ok" else None}
        return Response(body, status=status.HTTP_200_OK if healthy else status.HTTP_503_SERVICE_UNAVAILABLE)


def _outbox() -> dict:
    from django.utils import timezone

    from sagas.selectors import outbox_stats

    return outbox_stats(now=timezone.now())


def _check_database() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return "ok"
    except DatabaseError as exc:
        return f"error: {exc}"


def _check_broker() -> str:
    from config.celery import app

    conn = app.connection_for_write()
    try:
        conn.ensure_connection(max_retries=1, timeout=2)
        if isinstance(conn.transport, VirtualTransport):
            # Virtual transports (Redis, the embedded SQLAlchemy broker) connect lazily: the
            # SQLAlchemy one "connects" to a database it cannot open. Only a query proves it answers.
            conn.default_channel.queue_declare(queue=app.conf.task_default_queue)
        return "ok"
    except (BrokerError, OSError, *conn.connection_errors, *conn.channel_errors) as exc:
        return f"error: {type(exc).__name__}: {exc}"
    finally:
        conn.release()


class TokenApi(ObtainAuthToken):
    """POST {username, password} -> {token}; 400 for wrong credentials; 429 when throttled per
    client address, or when axes has locked out the username or the address (config.security).

    It authenticates no one: a token or session sent along would exempt the caller from the
    anonymous rate (and a bad one would answer 401 instead of checking the password)."""

    authentication_classes = []
    permission_classes = [AllowAny]
    throttle_classes = [AnonRateThrottle]
    # ObtainAuthToken brings DRF's own JSON parser (no depth or surrogate checks) and multipart
    # (whose file parts bypass the body size limit): JSON the API's way, or a plain form.
    parser_classes = [StrictJSONParser, FormParser]

    def post(self, request, *args, **kwargs):
        try:
            return super().post(request, *args, **kwargs)
        except ValidationError:
            # Axes makes a locked-out authenticate() look like wrong credentials; it marks the request.
            if is_locked_out(request):
                raise LoginLockedOut() from None
            raise


def not_found(request, exception):
    """A JSON 404 under /api/ (e.g. an order id that is not a UUID); Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=404)
    return page_not_found(request, exception)
