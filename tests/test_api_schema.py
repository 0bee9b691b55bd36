"""The OpenAPI schema tells the truth (issue 10, finding 7), checked two ways: what it declares
(status codes, nullable fields, bounds), and Schemathesis generating requests from it against
the app, with every check it has."""

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient
from schemathesis.config import SchemathesisConfig

from inventory.services import product_create
from orders.management.commands.seed_demo import CATALOGUE
from orders.models import OrderStatus
from tests.orders_helpers import a_user, an_operator
from tests.test_api_input import generous_throttle_rates  # noqa: F401  (a fixture)
from tests.test_orders_api import api_as

CUSTOMER_TOKEN, STAFF_TOKEN = "c" * 40, "s" * 40


def the_schema() -> dict:
    return yaml.safe_load(APIClient().get("/api/schema/").content)


# --- what the schema declares ---------------------------------------------------------------------


@pytest.mark.django_db
def test_every_operation_documents_its_errors_with_a_json_body():
    schema = the_schema()
    operations = {(method.upper(), path): op for path, ops in schema["paths"].items() for method, op in ops.items()}

    codes = {key: set(op["responses"]) for key, op in operations.items()}

    assert {"400", "401", "403", "409", "413", "415", "422", "429", "503"} <= codes[("POST", "/api/orders/")]
    assert {"400", "401", "404", "429", "503"} <= codes[("GET", "/api/orders/")]
    assert {"401", "404", "409"} <= codes[("POST", "/api/orders/{order_id}/cancel/")]
    assert {"401", "403", "404", "409"} <= codes[("POST", "/api/sagas/{saga_id}/abort/")]
    assert {"400", "413", "415", "429"} <= codes[("POST", "/api/auth/token/")]
    assert "413" not in codes[("GET", "/api/orders/")], "only operations that read a body refuse a big one"
    for (method, path), op in operations.items():
        for code, response in op["responses"].items():
            if code >= "400":
                assert "application/json" in response.get("content", {}), (method, path, code)


@pytest.mark.django_db
def test_fields_that_can_be_null_are_nullable():
    components = the_schema()["components"]["schemas"]

    for component, field in [
        ("OrderStepOutput", "started_at"),
        ("OrderStepOutput", "finished_at"),
        ("OrderSagaOutput", "finished_at"),
        ("StepExecutionOutput", "started_at"),
        ("StepExecutionOutput", "finished_at"),
        ("SagaOutput", "finished_at"),
        ("OrderEventOutput", "published_at"),
        ("OutboxEventOutput", "dead_lettered_at"),
    ]:
        assert components[component]["properties"][field].get("nullable") is True, (component, field)


@pytest.mark.django_db
def test_the_order_input_and_its_header_are_bounded_as_the_api_enforces_them():
    schema = the_schema()
    order_input = schema["components"]["schemas"]["OrderPlaceInput"]["properties"]
    line = schema["components"]["schemas"]["LineInput"]["properties"]
    post = schema["paths"]["/api/orders/"]["post"]
    key = next(p for p in post["parameters"] if p["name"] == "Idempotency-Key")
    listing = {p["name"]: p for p in schema["paths"]["/api/orders/"]["get"]["parameters"]}

    assert (order_input["items"]["minItems"], order_input["items"]["maxItems"]) == (1, 100)
    assert (line["quantity"]["minimum"], line["quantity"]["maximum"]) == (1, 1000)
    assert (line["sku"]["minLength"], line["sku"]["maxLength"]) == (1, 64)
    assert key["required"] is True
    assert key["schema"] == {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]([ -~]*[!-~])?$"}
    assert listing["status"]["schema"]["enum"] == sorted(OrderStatus.values)
    assert listing["cursor"]["schema"] == {"type": "string"}
    assert "page" not in listing, "a customer's orders are paged by cursor"
    products = {p["name"]: p for p in schema["paths"]["/api/products/"]["get"]["parameters"]}
    assert products["page"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}


@pytest.mark.django_db
def test_options_on_the_order_list_advertises_the_fields_a_client_sends_not_the_order_it_gets_back():
    response = api_as(a_user()).options("/api/orders/")

    assert response.status_code == 200
    assert set(response.json()["actions"]["POST"]) == {"items", "payment_method", "flow"}


# --- Schemathesis ---------------------------------------------------------------------------------

# Every check Schemathesis has, a bounded number of examples per operation. What each operation
# may answer to valid input beyond the defaults (2xx, 401, 403, 404, 409, 429) is listed with why.
SCHEMATHESIS = {
    "generation": {"max-examples": 100, "database": "none"},  # no .hypothesis/ left in the tree
    "checks": {"enabled": True},
    "operations": [
        {
            # A valid body can still name a SKU that is not in the catalogue (400), or reuse a key
            # with another body (422): neither can be expressed in the schema.
            "include-name": "POST /api/orders/",
            "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "403", "409", "422", "429"]}},
        },
        {
            # Well-formed credentials that match no user are a 400 (DRF's token endpoint).
            "include-name": "POST /api/auth/token/",
            "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "400", "401", "403", "429"]}},
        },
    ],
}
@pytest.fixture
def wsgi_keeps_the_test_transaction():
    """Requests go through the WSGI app, not Django's test client, so Django would close the
    database connection (and with it the test's transaction) after each; the test client does
    the same as this."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def shop(db, generous_throttle_rates, wsgi_keeps_the_test_transaction):  # noqa: F811
    """The demo catalogue, a customer and a staff user with known tokens."""
    for sku, name, price in CATALOGUE:
        product_create(sku=sku, name=name, price=price, on_hand=100_000)
    Token.objects.create(user=a_user("alice"), key=CUSTOMER_TOKEN)
    Token.objects.create(user=an_operator(), key=STAFF_TOKEN)


# Loaded from the app itself through WSGI when the tests are collected (no database needed).
# `schemathesis.pytest.from_fixture` would defer it, but it does not work with pytest 9.
schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application(), config=SchemathesisConfig.from_dict(SCHEMATHESIS))


@schema.parametrize()
# The shop is set up once per operation and its state carries over between examples, as a live
# API's would (orders accumulate, keys get reused): not a fixture that needs resetting.
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_the_api_answers_as_its_schema_says(case, shop):
    staff_only = case.operation.path.startswith(("/api/sagas/", "/api/outbox/"))
    token = STAFF_TOKEN if staff_only else CUSTOMER_TOKEN

    case.call_and_validate(headers={"Authorization": f"Token {token}"})
