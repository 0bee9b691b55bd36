"""API plumbing shared by every app: the error format, health, and the URL map."""

import hmac
import json
import logging

from django.conf import settings
from django.contrib.auth import get_user
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.authentication import TokenAuthentication
from rest_framework.exceptions import AuthenticationFailed, ValidationError
from django.http import JsonResponse
from django.views.defaults import page_not_found
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.parsers import FormParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler

from config import health
from config.outage import log_outage, outage_of, outage_response
from config.parsers import StrictJSONParser
from config.security import AnonRateThrottle, LoginLockedOut, is_locked_out
from sagas.permissions import VIEW_SAGA

log = logging.getLogger("chainsaga.api")


def exception_handler(exc, context):
    """DRF's handler; a part of the system that is down answers a JSON 503 with Retry-After
    (config.outage); anything else it does not know becomes a logged JSON 500, never an HTML page."""
    response = drf_exception_handler(exc, context)
    if response is None:
        response = _client_error(exc)
    if response is None and (component := outage_of(exc)):
        log_outage(component, context["request"], exc)
        outage = outage_response(component)
        return Response(json.loads(outage.content), status=outage.status_code, headers={"Retry-After": outage["Retry-After"]})
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


class HealthOutputSerializer(serializers.Serializer):
    status = serializers.ChoiceField(choices=["ok", "degraded", "down"])
    reasons = serializers.ListField(child=serializers.CharField(), required=False, help_text="staff and HEALTH_TOKEN only")
    checks = serializers.DictField(child=serializers.CharField(), required=False, help_text="staff and HEALTH_TOKEN only")
    workers = serializers.ListField(child=serializers.DictField(), required=False, help_text="staff and HEALTH_TOKEN only")
    queues_waiting = serializers.DictField(child=serializers.IntegerField(), required=False, allow_null=True)
    sagas = serializers.DictField(required=False)
    outbox = serializers.DictField(required=False, allow_null=True)
    rejected_messages_24h = serializers.IntegerField(required=False, allow_null=True)
    parked_deliveries_24h = serializers.IntegerField(required=False, allow_null=True)
    last_sweep = serializers.DateTimeField(required=False, allow_null=True)


class HealthRateThrottle(AnonRateThrottle):
    scope = "health"

    def get_rate(self) -> str:
        return settings.HEALTH_THROTTLE_RATE


class HealthApi(APIView):
    """`ok` / `degraded` (200) or `down` (503 with Retry-After), and nothing more for the public;
    staff and holders of HEALTH_TOKEN (`Authorization: Bearer ...`) also get the reasons and the
    details: each part's check, the workers, waiting queues, sagas that need attention, the outbox
    and rejected messages (config.health)."""

    permission_classes = [AllowAny]
    authentication_classes = []  # who may see details is decided below, without failing anyone
    throttle_classes = [HealthRateThrottle]

    @extend_schema(responses={200: HealthOutputSerializer, 503: HealthOutputSerializer})
    def get(self, request):
        outcomes = health.run_checks(timeout=settings.HEALTH_CHECK_TIMEOUT)
        state, reasons = health.assess(outcomes)
        body = {"status": state}
        if _may_see_details(request):
            body.update(health.details(outcomes, reasons))
        if state == "down":
            return Response(body, status=status.HTTP_503_SERVICE_UNAVAILABLE, headers={"Retry-After": str(settings.OUTAGE_RETRY_AFTER)})
        return Response(body)


def _may_see_details(request) -> bool:
    header = request.headers.get("Authorization", "")
    token = settings.HEALTH_TOKEN
    if token and header.startswith("Bearer ") and hmac.compare_digest(header[7:].strip().encode(), token.encode()):
        return True
    user = request.user  # anonymous here (no authentication classes) unless a test forced one
    if not user.is_authenticated:
        user = get_user(request._request)  # a staff session (the admin's)
    if not user.is_authenticated:
        try:
            authenticated = TokenAuthentication().authenticate(request)
        except AuthenticationFailed:
            return False
        user = authenticated[0] if authenticated else None
    return bool(user and user.is_staff and user.has_perm(VIEW_SAGA))


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
