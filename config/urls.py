from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from config.api import HealthApi, TokenApi
from config.schema_views import SchemaView, SwaggerDocsView
from inventory.api import ProductListApi
from orders.api import OrderCancelApi, OrderDetailApi, OrderListCreateApi
from sagas.api import (
    DeadLetterListApi,
    OutboxReplayApi,
    ParkedDeliveryListApi,
    ParkedDeliveryReplayApi,
    SagaAbortApi,
    SagaDetailApi,
    SagaListApi,
    SagaRetryApi,
)
from sagas.metrics import metrics_view

api = [
    path("auth/token/", TokenApi.as_view(), name="api-token"),
    path("health/", HealthApi.as_view(), name="api-health"),
    path("products/", ProductListApi.as_view(), name="api-products"),
    path("orders/", OrderListCreateApi.as_view(), name="api-orders"),
    path("orders/<uuid:order_id>/", OrderDetailApi.as_view(), name="api-order"),
    path("orders/<uuid:order_id>/cancel/", OrderCancelApi.as_view(), name="api-order-cancel"),
    path("sagas/", SagaListApi.as_view(), name="api-sagas"),
    path("sagas/<uuid:saga_id>/", SagaDetailApi.as_view(), name="api-saga"),
    path("sagas/<uuid:saga_id>/retry/", SagaRetryApi.as_view(), name="api-saga-retry"),
    path("sagas/<uuid:saga_id>/abort/", SagaAbortApi.as_view(), name="api-saga-abort"),
    path("outbox/dead-letter/", DeadLetterListApi.as_view(), name="api-outbox-dead-letter"),
    path("outbox/<uuid:event_id>/replay/", OutboxReplayApi.as_view(), name="api-outbox-replay"),
    path("consumers/parked/", ParkedDeliveryListApi.as_view(), name="api-consumers-parked"),
    path("consumers/parked/<int:parked_id>/replay/", ParkedDeliveryReplayApi.as_view(), name="api-consumers-parked-replay"),
    path("schema/", SchemaView.as_view(), name="api-schema"),
    path("docs/", SwaggerDocsView.as_view(url_name="api-schema"), name="api-docs"),
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include(api)),
    path("metrics", metrics_view, name="metrics"),
    path("", RedirectView.as_view(url="/api/docs/", permanent=False)),
]

handler404 = "config.api.not_found"
