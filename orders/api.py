"""The orders API: place (with Idempotency-Key), list, inspect with the saga timeline, cancel."""

from django.conf import settings
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema, extend_schema_field, extend_schema_serializer
from rest_framework import serializers, status
from rest_framework.exceptions import ValidationError
from rest_framework.generics import ListAPIView
from rest_framework.response import Response
from rest_framework.views import APIView

from config.pagination import NewestFirstCursorPagination
from config.schema import error, validation_error
from orders.models import Flow, Order, OrderStatus
from orders.sagas import customer_reason, customer_step_text
from orders.selectors import orders_with_events
from orders.services import (
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    LineRequest,
    MixedCurrencies,
    OrderNotCancellable,
    OrderTooLarge,
    SUPPORTED_FLOWS,
    TooManyPendingOrders,
    UnknownProducts,
    UnsupportedFlow,
    order_cancel,
    order_place,
)
from payments.gateway import PAYMENT_METHODS
from sagas.api import filter_by_choice
from sagas.models import Direction, SagaState, StepState
from sagas.selectors import saga_timeline
from sagas.services import saga_failure

IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
# Printable ASCII, no space at either end: what survives every proxy unchanged, and what the
# schema promises (a NUL or other control character would otherwise reach the database).
KEY_PATTERN = r"^[!-~]([ -~]*[!-~])?$"
MAX_QUANTITY = 1000
MAX_ITEMS = 100


class StrictIntegerField(serializers.IntegerField):
    """An integer that must be a JSON integer: "2", 2.0 and true are refused, not coerced."""

    default_error_messages = {"invalid": "A JSON integer is required."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class LineInputSerializer(serializers.Serializer):
    sku = serializers.CharField(min_length=1, max_length=64)
    quantity = StrictIntegerField(min_value=1, max_value=MAX_QUANTITY)


@extend_schema_serializer(
    examples=[
        OpenApiExample(
            "Two keyboards and a mouse",
            value={"items": [{"sku": "KBD-001", "quantity": 2}, {"sku": "MSE-002", "quantity": 1}], "payment_method": "pm_ok"},
            request_only=True,
        )
    ]
)
class OrderPlaceInputSerializer(serializers.Serializer):
    """Only these fields are read; anything else a client sends (total, status, owner) is ignored."""

    # A ListField, not many=True: its bounds reach the schema as minItems/maxItems.
    items = serializers.ListField(child=LineInputSerializer(), min_length=1, max_length=MAX_ITEMS)
    payment_method = serializers.ChoiceField(choices=PAYMENT_METHODS)
    flow = serializers.ChoiceField(choices=SUPPORTED_FLOWS, default=Flow.ORCHESTRATED)

    def validate_items(self, items):
        skus = [item["sku"] for item in items]
        duplicates = sorted({sku for sku in skus if skus.count(sku) > 1})
        if duplicates:
            raise serializers.ValidationError(f"each sku may appear once; repeated: {', '.join(duplicates)}")
        return items


class OrderItemOutputSerializer(serializers.Serializer):
    sku = serializers.CharField()
    quantity = serializers.IntegerField()
    unit_price = serializers.DecimalField(max_digits=12, decimal_places=2)
    line_total = serializers.DecimalField(max_digits=14, decimal_places=2)


class OrderEventOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    event_type = serializers.CharField()
    payload = serializers.JSONField()
    created_at = serializers.DateTimeField()
    published_at = serializers.DateTimeField(allow_null=True, help_text="null until the relay published it")


class OrderStepOutputSerializer(serializers.Serializer):
    """One step of the order's saga as the customer sees it: the error is the business reason
    or a neutral sentence, never the staff log's exception text (see orders.sagas)."""

    name = serializers.CharField()
    direction = serializers.ChoiceField(choices=Direction.choices)
    state = serializers.ChoiceField(choices=StepState.choices)
    attempts = serializers.IntegerField()
    deliveries = serializers.IntegerField()
    started_at = serializers.DateTimeField(allow_null=True, help_text="null until the step first ran")
    finished_at = serializers.DateTimeField(allow_null=True, help_text="null until the step completed or failed")
    error = serializers.SerializerMethodField()

    def get_error(self, execution) -> str:
        return customer_step_text(execution)


class OrderSagaOutputSerializer(serializers.Serializer):
    """The order's saga for its customer: the staff saga API (/api/sagas/) has the internals."""

    id = serializers.UUIDField()
    name = serializers.CharField()
    version = serializers.IntegerField()
    state = serializers.ChoiceField(choices=SagaState.choices)
    failure_reason = serializers.SerializerMethodField(help_text="why the saga was undone; empty while it was not")
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True, help_text="null while the saga runs")
    redrives = serializers.IntegerField()
    steps = serializers.SerializerMethodField()

    def get_failure_reason(self, saga) -> str:
        return customer_reason(saga_failure(saga)) if saga.failure_reason else ""

    @extend_schema_field(OrderStepOutputSerializer(many=True))
    def get_steps(self, saga) -> list[dict]:
        """The timeline: every step and compensation in the order they started."""
        return OrderStepOutputSerializer(saga_timeline(saga), many=True).data


class OrderSagaSummaryOutputSerializer(serializers.Serializer):
    """What an order keeps of its saga once retention pruned the saga's log."""

    id = serializers.UUIDField(source="pruned_saga_id")
    state = serializers.CharField(source="saga_outcome", help_text="how the saga ended: COMPLETED or COMPENSATED")
    finished_at = serializers.DateTimeField(source="saga_finished_at", allow_null=True)


class OrderOutputSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    status = serializers.CharField()
    total = serializers.DecimalField(max_digits=12, decimal_places=2)
    currency = serializers.CharField()
    payment_method = serializers.CharField()
    flow = serializers.CharField()
    cancel_reason = serializers.CharField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    items = OrderItemOutputSerializer(many=True)
    saga = OrderSagaOutputSerializer(
        allow_null=True, help_text="the orchestrating saga; null in the choreographed flow, and once its log was pruned (see saga_summary)"
    )
    saga_summary = serializers.SerializerMethodField(
        help_text="what the order keeps of its saga after the retention period pruned the saga's log; null until then"
    )
    # Set on each order by orders_with_events (one query for a whole page).
    events = OrderEventOutputSerializer(many=True, help_text="the order's events, in the order they happened")

    @extend_schema_field(OrderSagaSummaryOutputSerializer(allow_null=True))
    def get_saga_summary(self, order) -> dict | None:
        return OrderSagaSummaryOutputSerializer(order).data if order.saga_pruned else None


def _orders_of(user):
    """The user's orders with what the output shows, read a page at a time: items and saga steps
    in one query each (and events with orders_with_events)."""
    return Order.objects.filter(owner=user).select_related("saga").prefetch_related("items", "saga__steps")


def _order_of(user, order_id) -> Order:
    """One of the user's orders with its events, or 404."""
    return orders_with_events([get_object_or_404(_orders_of(user), pk=order_id)])[0]


class IdempotencyHeaderInputSerializer(serializers.Serializer):
    """The request's Idempotency-Key header; errors are keyed by the header's name."""

    def get_fields(self):
        key = serializers.RegexField(
            KEY_PATTERN,
            max_length=MAX_KEY_LENGTH,
            trim_whitespace=False,
            error_messages={
                "required": f"the {IDEMPOTENCY_HEADER} header is required",
                "blank": f"the {IDEMPOTENCY_HEADER} header must not be blank",
                "invalid": "printable ASCII characters only, not starting or ending with a space",
                "max_length": f"at most {MAX_KEY_LENGTH} characters",
            },
        )
        return {IDEMPOTENCY_HEADER: key}


def _idempotency_key(request) -> str:
    sent = {IDEMPOTENCY_HEADER: request.headers[IDEMPOTENCY_HEADER]} if IDEMPOTENCY_HEADER in request.headers else {}
    header = IdempotencyHeaderInputSerializer(data=sent)
    header.is_valid(raise_exception=True)
    return header.validated_data[IDEMPOTENCY_HEADER]


class OrderListCreateApi(ListAPIView):
    serializer_class = OrderOutputSerializer
    pagination_class = NewestFirstCursorPagination

    def get_serializer_class(self):
        # OPTIONS describes POST with this: what a client sends, not the order it gets back.
        return OrderPlaceInputSerializer if self.request.method == "POST" else OrderOutputSerializer

    @extend_schema(parameters=[OpenApiParameter("status", enum=OrderStatus.values, description="only orders in this status")])
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    def get_queryset(self):
        return filter_by_choice(_orders_of(self.request.user), self.request.query_params, "status", OrderStatus.choices)

    def list(self, request, *args, **kwargs):
        page = orders_with_events(self.paginate_queryset(self.get_queryset()))
        return self.get_paginated_response(OrderOutputSerializer(page, many=True).data)

    @extend_schema(
        request=OrderPlaceInputSerializer,
        responses={
            201: OrderOutputSerializer,
            409: validation_error(f"A request with this {IDEMPOTENCY_HEADER} is still in progress."),
            422: validation_error(f"This {IDEMPOTENCY_HEADER} was used before with a different request."),
            429: error("Too many requests, or the caller has as many orders in progress as one customer may have."),
        },
        parameters=[
            OpenApiParameter(
                IDEMPOTENCY_HEADER,
                location=OpenApiParameter.HEADER,
                required=True,
                type={"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH, "pattern": KEY_PATTERN},
                description="Your key for this order: the same key and body again returns the first order.",
            )
        ],
    )
    def post(self, request):
        key = _idempotency_key(request)
        data = OrderPlaceInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            result = order_place(
                owner=request.user,
                lines=[LineRequest(item["sku"], item["quantity"]) for item in data.validated_data["items"]],
                payment_method=data.validated_data["payment_method"],
                flow=data.validated_data["flow"],
                idempotency_key=key,
                max_pending=settings.ORDER_MAX_PENDING_PER_CUSTOMER,
            )
        except UnknownProducts as exc:
            raise ValidationError({"items": [f"unknown sku: {sku}" for sku in exc.skus]}) from None
        except (MixedCurrencies, OrderTooLarge) as exc:
            raise ValidationError({"items": [str(exc)]}) from None
        except UnsupportedFlow as exc:
            raise ValidationError({"flow": [str(exc)]}) from None
        except IdempotencyKeyReused as exc:
            return Response({IDEMPOTENCY_HEADER: [str(exc)]}, status=status.HTTP_422_UNPROCESSABLE_ENTITY)
        except IdempotencyKeyInFlight as exc:
            return Response({IDEMPOTENCY_HEADER: [str(exc)]}, status=status.HTTP_409_CONFLICT)
        except TooManyPendingOrders as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_429_TOO_MANY_REQUESTS)
        order = _order_of(request.user, result.order.pk)
        headers = {"Location": f"/api/orders/{order.id}/"}
        if result.replayed:
            headers["Idempotent-Replayed"] = "true"
        return Response(OrderOutputSerializer(order).data, status=status.HTTP_201_CREATED, headers=headers)


class OrderDetailApi(APIView):
    @extend_schema(responses=OrderOutputSerializer)
    def get(self, request, order_id):
        return Response(OrderOutputSerializer(_order_of(request.user, order_id)).data)


class OrderCancelApi(APIView):
    """202 while the order's saga compensates; 200 when already cancelled; 409 when too late."""

    @extend_schema(
        request=None,
        responses={200: OrderOutputSerializer, 202: OrderOutputSerializer, 409: error("The order can no longer be cancelled.")},
    )
    def post(self, request, order_id):
        order = _order_of(request.user, order_id)
        if order.status == OrderStatus.CANCELLED:
            return Response(OrderOutputSerializer(order).data, status=status.HTTP_200_OK)
        try:
            order_cancel(order=order)
        except OrderNotCancellable as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
        order = _order_of(request.user, order.pk)
        code = status.HTTP_200_OK if order.status == OrderStatus.CANCELLED else status.HTTP_202_ACCEPTED
        return Response(OrderOutputSerializer(order).data, status=code)
