"""Nothing a client sends makes the API answer 5xx (issue 10, finding 3): bodies nested too
deep, unpaired surrogates, bodies over the size limit, control characters in headers, junk
query parameters. Each is refused with a 4xx and a JSON body that says what is wrong."""

import json
import re
import uuid

import pytest
from django.conf import settings
from django.utils import timezone
from rest_framework.test import APIClient
from rest_framework.throttling import SimpleRateThrottle

from config.urls import api as api_routes
from orders.models import IdempotencyRecord, Order
from sagas.consumers import consumer_give_up
from sagas.models import OutboxEvent, ParkedDelivery, SagaInstance, SagaState
from sagas.publishers import message
from tests.orders_helpers import a_product, a_user, an_operator, an_order
from tests.test_orders_api import ORDERS, an_order_body, api_as, place

PRODUCTS = "/api/products/"

TOKEN = "/api/auth/token/"
JSON = "application/json"
TOO_BIG = settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def over_the_size_limit() -> str:
    return json.dumps({**an_order_body(), "padding": "x" * TOO_BIG})


# What the attacker sent (issue 10), and more of the same kind. Each: request keyword arguments.
ORDER_JSON = json.dumps(an_order_body())
HOSTILE_INPUTS = {
    "JSON nested 1,100 deep": {"data": nested(1100), "content_type": JSON},
    "unpaired surrogates in every field": {
        "data": '{"items": [{"sku": "\\ud800", "quantity": 1}], "payment_method": "\\ud800", "flow": "\\udfff",'
        ' "username": "\\ud800", "password": "\\ud800"}',
        "content_type": JSON,
    },
    "an unpaired surrogate in a key": {"data": '{"\\udc00": 1, "payment_method": "pm_ok"}', "content_type": JSON},
    "a body over the size limit": {"data": over_the_size_limit(), "content_type": JSON},
    "a body that is not UTF-8": {"data": b'{"payment_method": "\xff\xfe"}', "content_type": JSON},
    "a charset that is not a text encoding": {"data": ORDER_JSON, "content_type": f"{JSON}; charset=rot13"},
    "a NUL byte in Idempotency-Key": {"data": ORDER_JSON, "content_type": JSON, "headers": {"Idempotency-Key": "k\x00"}},
    "an escape character in Idempotency-Key": {"data": ORDER_JSON, "content_type": JSON, "headers": {"Idempotency-Key": "\x1b[2J"}},
    "an Idempotency-Key of 10,000 characters": {"data": ORDER_JSON, "content_type": JSON, "headers": {"Idempotency-Key": "k" * 10_000}},
    "a NUL byte in the token": {"data": ORDER_JSON, "content_type": JSON, "HTTP_AUTHORIZATION": "Token abc\x00def"},
    "a NUL byte in the session cookie": {"HTTP_COOKIE": "sessionid=abcdefgh\x00ijkl"},
    "a Content-Length that is not a number": {"data": ORDER_JSON, "content_type": JSON, "CONTENT_LENGTH": "12abc"},
    "junk query parameters": {"QUERY_STRING": "page=junk&status=%00&state=%ff%fe&page=-1"},
    "a page number past any page": {"QUERY_STRING": "page=99999999999999999999"},
}


def api_requests(ids: dict[str, str]):
    """(route name, method, path) for every operation in the API's URL conf, path parameters
    filled with `ids` (real objects, so the views get past their lookups)."""
    for route in api_routes:
        view = route.callback.cls
        path = "/api/" + re.sub(r"<(?:\w+:)?(\w+)>", lambda m: ids[m.group(1)], str(route.pattern))
        for method in view().allowed_methods:
            yield route.name, method.lower(), path


@pytest.fixture
def generous_throttle_rates(settings, monkeypatch):
    """Throttling is not what is tested here: budgets no test run reaches, in a cache of its own."""
    rates = {"anon": "100000/min", "user": "100000/min"}
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": f"t-{uuid.uuid4()}"}}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}
    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", rates)


@pytest.mark.django_db
def test_no_hostile_input_to_any_endpoint_gets_a_5xx_and_every_refusal_is_json(generous_throttle_rates):
    a_product()
    customer, staff = a_user("alice"), an_operator()
    order = an_order(user=customer)
    event = OutboxEvent.objects.first()
    consumer_give_up(consumer="test-recorder", message=message(event), reason="a parked delivery to replay")
    ids = {
        "order_id": str(order.id), "saga_id": str(order.saga_id), "event_id": str(event.id),
        "parked_id": str(ParkedDelivery.objects.get().pk),
    }
    callers = {"anonymous": APIClient(), "customer": api_as(customer), "staff": api_as(staff)}
    for client in callers.values():
        client.raise_request_exception = False  # a crash must show up as the 500 a client would get
    wrong, sent = [], 0

    for route, method, path in api_requests(ids):
        for input_name, request in HOSTILE_INPUTS.items():
            for caller, client in callers.items():
                response = client.generic(method.upper(), path, **request)
                sent += 1
                expect_json = response.status_code >= 400 or route not in ("api-schema", "api-docs")
                if response.status_code >= 500 or (expect_json and not _is_json(response)):
                    wrong.append(f"{method.upper()} {path} as {caller}, {input_name}: {response.status_code} {response.content[:120]!r}")

    assert sent >= 12 * len(HOSTILE_INPUTS) * len(callers), "every endpoint was tried"
    assert not wrong, "\n".join(wrong)


def _is_json(response) -> bool:
    if not response["Content-Type"].startswith(JSON):
        return False
    try:
        json.loads(response.content)
    except ValueError:
        return False
    return True


# --- each refusal says what is wrong ---------------------------------------------------------------


@pytest.fixture
def customer():
    a_product()
    return api_as(a_user())


def post_json(client, path, text, **headers):
    return client.post(path, data=text, content_type=JSON, headers=headers)


@pytest.mark.django_db
@pytest.mark.parametrize("path", [ORDERS, TOKEN])
def test_json_nested_deeper_than_32_levels_gets_a_400_naming_the_limit(customer, path):
    response = post_json(customer, path, nested(1100), **{"Idempotency-Key": "deep"})

    assert response.status_code == 400
    assert "nested 1100 levels deep; at most 32" in response.json()["detail"]
    assert not Order.objects.exists()


@pytest.mark.django_db
def test_json_nested_32_levels_is_parsed_and_judged_by_the_serializer(customer):
    body = {**an_order_body(), "extra": json.loads(nested(31))}  # 31 + the object itself = 32

    response = post_json(customer, ORDERS, json.dumps(body), **{"Idempotency-Key": "deep-enough"})

    assert response.status_code == 201, response.content


@pytest.mark.django_db
def test_brackets_inside_strings_do_not_count_as_nesting(customer):
    response = post_json(customer, ORDERS, json.dumps(an_order_body(sku="[" * 70)), **{"Idempotency-Key": "brackets"})

    assert response.status_code == 400
    assert "no more than 64 characters" in json.dumps(response.json()["items"])


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path, text",
    [
        (ORDERS, '{"items": [{"sku": "SKU-1", "quantity": 1}], "payment_method": "\\ud800"}'),
        (ORDERS, '{"items": [{"sku": "SKU-1", "quantity": 1}], "payment_method": "pm_ok", "flow": "\\ud800"}'),
        (ORDERS, '{"items": [{"sku": "SKU-1", "quantity": 1}], "payment_method": "pm_ok", "\\uDFFF": 1}'),
        (TOKEN, '{"username": "alice", "password": "x\\ud83d"}'),
    ],
    ids=["payment_method", "flow", "a key", "token password"],
)
def test_an_unpaired_surrogate_in_any_string_gets_a_400_naming_it(customer, path, text):
    response = post_json(customer, path, text, **{"Idempotency-Key": "surrogate"})

    assert response.status_code == 400
    assert "unpaired surrogate" in response.json()["detail"]
    assert not Order.objects.exists()


@pytest.mark.django_db
def test_a_surrogate_pair_is_an_ordinary_character(customer):
    text = '{"items": [{"sku": "SKU-1", "quantity": 1}], "payment_method": "\\ud83d\\ude00"}'

    response = post_json(customer, ORDERS, text, **{"Idempotency-Key": "emoji"})

    assert response.status_code == 400
    assert response.json() == {"payment_method": ['"\U0001f600" is not a valid choice.']}


@pytest.mark.django_db
@pytest.mark.parametrize("path, content_type", [(ORDERS, JSON), (TOKEN, JSON), (TOKEN, "application/x-www-form-urlencoded")])
def test_a_body_over_the_size_limit_gets_a_413_json_error(customer, path, content_type):
    body = over_the_size_limit() if content_type == JSON else f"username=alice&password={'x' * TOO_BIG}"

    response = customer.post(path, data=body, content_type=content_type, headers={"Idempotency-Key": "big"})

    assert response.status_code == 413
    assert f"larger than the {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes" in response.json()["detail"]
    assert not Order.objects.exists()


@pytest.mark.django_db
def test_the_token_endpoint_no_longer_takes_multipart_bodies_whose_files_escape_the_size_limit():
    response = APIClient().post(TOKEN, {"username": "alice", "password": "x"}, format="multipart")

    assert response.status_code == 415


@pytest.mark.django_db
@pytest.mark.parametrize(
    "headers, named",
    [
        ({"Idempotency-Key": "k\x00"}, "Idempotency-Key"),
        ({"Idempotency-Key": "k\x1b"}, "Idempotency-Key"),
        ({"Idempotency-Key": "k", "Authorization": "Token \x00"}, "Authorization"),
        ({"Idempotency-Key": "k", "X-Anything": "a\nb"}, "X-Anything"),
    ],
    ids=["NUL in the key", "ESC in the key", "NUL in the token", "newline in any header"],
)
def test_a_control_character_in_a_header_gets_a_400_naming_the_header(customer, headers, named):
    client = customer if "Authorization" not in headers else APIClient()

    response = client.post(ORDERS, an_order_body(), format="json", headers=headers)

    assert response.status_code == 400
    assert response.json() == {"detail": f"the {named} header contains a control character"}
    assert not IdempotencyRecord.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize("key", [" leading", "trailing ", "caf\u00e9", "tab\tinside"])
def test_an_idempotency_key_outside_printable_ascii_or_padded_gets_a_400_naming_the_header(customer, key):
    response = place(customer, an_order_body(), key=key)

    assert response.status_code == 400
    assert "printable ASCII" in response.json()["Idempotency-Key"][0]
    assert not Order.objects.exists()


@pytest.mark.django_db
def test_an_idempotency_key_with_inner_spaces_and_punctuation_is_accepted(customer):
    response = place(customer, an_order_body(), key="order 42/retry#1 ~ok")

    assert response.status_code == 201, response.content


@pytest.mark.django_db
@pytest.mark.parametrize("page", ["junk", "0", "-1", "1.0", "last", "\u0661", "99999999999999999999"])
def test_a_page_that_is_not_a_positive_integer_gets_a_400_naming_page(customer, page):
    response = customer.get(PRODUCTS, {"page": page})  # a list paged by number (orders go by cursor)

    assert response.status_code == 400
    assert "page" in response.json()


@pytest.mark.django_db
def test_a_page_past_the_last_is_not_found(customer):
    response = customer.get(PRODUCTS, {"page": 2})

    assert response.status_code == 404
    assert "detail" in response.json()


@pytest.mark.django_db
@pytest.mark.parametrize("action, state", [("abort", SagaState.RUNNING), ("retry", SagaState.FAILED)])
def test_an_operator_action_on_a_saga_whose_definition_is_unknown_gets_a_409_not_a_500(action, state):
    now = timezone.now()
    saga = SagaInstance.objects.create(name="retired_process", version=1, state=state, created_at=now, updated_at=now)

    response = api_as(an_operator()).post(f"/api/sagas/{saga.id}/{action}/")

    assert response.status_code == 409
    assert "retired_process v1 is not registered" in response.json()["detail"]
    assert SagaInstance.objects.get(pk=saga.pk).state == state
