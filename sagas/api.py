"""Staff API over the saga log: list, inspect, retry a FAILED saga's compensation, abort. Each
operation needs the same permissions as in the admin (sagas.permissions)."""

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.generics import ListAPIView
from rest_framework.response import Response
from rest_framework.views import APIView

from config.pagination import NewestFirstCursorPagination
from config.schema import error
from sagas.exceptions import SagaStateConflict, UnknownSagaDefinition
from sagas.consumers import consumer_replay
from sagas.models import OutboxEvent, ParkedDelivery, SagaInstance, SagaState
from sagas.permissions import (
    ABORT_SAGA,
    REPLAY_OUTBOX_EVENT,
    REPLAY_PARKED_DELIVERY,
    RETRY_SAGA,
    VIEW_OUTBOX_EVENT,
    VIEW_PARKED_DELIVERY,
    VIEW_SAGA,
    staff_with,
)
from sagas.relay import outbox_replay
from sagas.selectors import saga_timeline
from sagas.services import saga_abort, saga_retry_compensation


def filter_by_choice(queryset, params, field: str, choices):
    """`queryset` narrowed to `?<field>=<one of choices>`; a value not among them is a 400 naming the field."""
    # A plain dict, not the QueryDict: DRF reads "?status=" from a QueryDict as a form field left
    # empty (no filter, 200); it is a value outside the choices.
    given = {field: params[field]} if field in params else {}
    filters = type(f"{field.title()}Filter", (serializers.Serializer,), {field: serializers.ChoiceField(choices=choices, required=False)})(
        data=given
    )
    filters.is_valid(raise_exception=True)
    if field in filters.validated_data:
        queryset = queryset.filter(**{field: filters.validated_data[field]})
    return queryset



class StepExecutionOutputSerializer(serializers.Serializer):
    name = serializers.CharField()
    direction = serializers.CharField()
    state = serializers.CharField()
    attempts = serializers.IntegerField()
    deliveries = serializers.IntegerField()
    started_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    error = serializers.CharField(source="last_error")


class SagaOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    version = serializers.IntegerField()
    state = serializers.CharField()
    failure_reason = serializers.CharField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    redrives = serializers.IntegerField()
    steps = serializers.SerializerMethodField()

    @extend_schema_field(StepExecutionOutputSerializer(many=True))
    def get_steps(self, saga) -> list[dict]:
        """The timeline: every step and compensation in the order they started."""
        return StepExecutionOutputSerializer(saga_timeline(saga), many=True).data


class SagaListApi(ListAPIView):
    permission_classes = [staff_with(VIEW_SAGA)]
    serializer_class = SagaOutputSerializer
    pagination_class = NewestFirstCursorPagination  # through saga_created_idx, however long the log

    @extend_schema(parameters=[OpenApiParameter("state", enum=SagaState.values)])
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        sagas = SagaInstance.objects.prefetch_related("steps")
        return filter_by_choice(sagas, self.request.query_params, "state", SagaState.choices)


class SagaDetailApi(APIView):
    permission_classes = [staff_with(VIEW_SAGA)]

    @extend_schema(responses=SagaOutputSerializer)
    def get(self, request, saga_id):
        saga = get_object_or_404(SagaInstance.objects.prefetch_related("steps"), pk=saga_id)
        return Response(SagaOutputSerializer(saga).data)


def _operate(saga_id, operation) -> Response:
    """Run an operator action on a saga: 202 with the saga, 404 if unknown, 409 if its state forbids
    it or this process does not know its definition (e.g. a version retired by a deploy)."""
    get_object_or_404(SagaInstance, pk=saga_id)
    try:
        saga = operation()
    except (SagaStateConflict, UnknownSagaDefinition) as exc:
        return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
    return Response(SagaOutputSerializer(saga).data, status=status.HTTP_202_ACCEPTED)


class SagaRetryApi(APIView):
    """Give a FAILED saga's compensations a fresh budget (202), or 409 if it is not FAILED."""

    permission_classes = [staff_with(VIEW_SAGA, RETRY_SAGA)]

    @extend_schema(request=None, responses={202: SagaOutputSerializer, 409: error("The saga is not FAILED, or its definition is unknown here.")})
    def post(self, request, saga_id):
        return _operate(saga_id, lambda: saga_retry_compensation(saga_id=saga_id))


class SagaAbortApi(APIView):
    """Abort a running saga: it compensates (202). 409 when it already COMPLETED."""

    permission_classes = [staff_with(VIEW_SAGA, ABORT_SAGA)]

    @extend_schema(request=None, responses={202: SagaOutputSerializer, 409: error("The saga COMPLETED, or its definition is unknown here.")})
    def post(self, request, saga_id):
        reason = f"aborted by {request.user.get_username()}"
        return _operate(saga_id, lambda: saga_abort(saga_id=saga_id, reason=reason))


class OutboxEventOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    sequence = serializers.IntegerField()
    aggregate_type = serializers.CharField()
    aggregate_id = serializers.CharField()
    event_type = serializers.CharField()
    payload = serializers.JSONField()
    created_at = serializers.DateTimeField()
    published_at = serializers.DateTimeField(allow_null=True)
    attempts = serializers.IntegerField()
    last_error = serializers.CharField()
    dead_lettered_at = serializers.DateTimeField(allow_null=True)


class DeadLetterListApi(ListAPIView):
    """Staff: events parked after too many failed publishes (they hold back their aggregate)."""

    permission_classes = [staff_with(VIEW_OUTBOX_EVENT)]
    serializer_class = OutboxEventOutputSerializer

    def get_queryset(self):
        return OutboxEvent.objects.filter(published_at__isnull=True, dead_lettered_at__isnull=False).order_by("sequence")


class OutboxReplayApi(APIView):
    """Staff: put a dead-lettered event back in line with a fresh retry budget (202); 409 if it is not dead-lettered."""

    permission_classes = [staff_with(VIEW_OUTBOX_EVENT, REPLAY_OUTBOX_EVENT)]

    @extend_schema(request=None, responses={202: OutboxEventOutputSerializer, 409: error("The event is not dead-lettered.")})
    def post(self, request, event_id):
        event = get_object_or_404(OutboxEvent, id=event_id)
        if not outbox_replay(event_ids=[event.pk]):
            return Response({"detail": f"event {event.id} is not in the dead letter"}, status=status.HTTP_409_CONFLICT)
        event.refresh_from_db()
        return Response(OutboxEventOutputSerializer(event).data, status=status.HTTP_202_ACCEPTED)


class ParkedDeliveryOutputSerializer(serializers.Serializer):
    id = serializers.IntegerField()
    consumer = serializers.CharField()
    event_id = serializers.UUIDField()
    event_type = serializers.CharField()
    aggregate_type = serializers.CharField()
    aggregate_id = serializers.CharField()
    reason = serializers.CharField()
    parked_at = serializers.DateTimeField()
    settled = serializers.BooleanField(help_text="the consumer's settlement (on_give_up) ran when it gave up")


class ParkedDeliveryListApi(ListAPIView):
    """Staff: events a consumer gave up on (parked once, settled, not sent again unless replayed)."""

    permission_classes = [staff_with(VIEW_PARKED_DELIVERY)]
    serializer_class = ParkedDeliveryOutputSerializer

    def get_queryset(self):
        return ParkedDelivery.objects.order_by("-parked_at", "-id")


class ParkedDeliveryReplayApi(APIView):
    """Staff: deliver a parked event to its consumer again with a fresh budget (202); 409 when the
    event is no longer retained in the outbox."""

    permission_classes = [staff_with(VIEW_PARKED_DELIVERY, REPLAY_PARKED_DELIVERY)]

    @extend_schema(request=None, responses={202: ParkedDeliveryOutputSerializer, 409: error("The event is no longer retained.")})
    def post(self, request, parked_id):
        parked = get_object_or_404(ParkedDelivery, pk=parked_id)
        data = ParkedDeliveryOutputSerializer(parked).data
        try:
            consumer_replay(parked=parked)
        except OutboxEvent.DoesNotExist:
            return Response({"detail": f"event {parked.event_id} is no longer retained; it cannot be replayed"}, status=status.HTTP_409_CONFLICT)
        return Response(data, status=status.HTTP_202_ACCEPTED)
