"""The REST API: auth, catalogue, placing orders (validation, idempotency), reading, cancelling,
the staff saga endpoints, health, throttling, CSRF and the OpenAPI schema.

Most tests need no worker: the saga is sent on commit, which a non-transactional test never
reaches. The tests that need the saga to run use `saga_worker` (a real celery worker)."""

import base64
import json
import re
import secrets
import threading
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
import yaml
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient
from rest_framework.throttling import SimpleRateThrottle

from inventory.models import Stock
from inventory.services import product_create, stock_reserve
from orders.models import IdempotencyRecord, Order, OrderStatus
from orders.services import LineRequest, _claim_key, _fingerprint
from payments.models import Payment
from sagas import runner
from sagas.definition import FORWARD
from sagas.models import Direction, SagaInstance, SagaState, StepState
from sagas.testing import inject_fault, timeline, wait_for_saga
from tests.engine_helpers import wait_for_step
from tests.orders_helpers import a_product, a_user, an_operator, an_order, assert_shop_invariants

ORDERS = "/api/orders/"


def api_as(user=None, **kwargs) -> APIClient:
    """A client authenticated the way API users are: with their token (anonymous without a user)."""
    client = APIClient(**kwargs)
    if user is not None:
        token, _ = Token.objects.get_or_create(user=user)
        client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def place(client, body, *, key="key-1"):
    return client.post(ORDERS, body, format="json", headers={"Idempotency-Key": key})


def an_order_body(sku="SKU-1", quantity=2, payment_method="pm_ok", **extra) -> dict:
    return {"items": [{"sku": sku, "quantity": quantity}], "payment_method": payment_method, **extra}


def finished(order_id):
    order = Order.objects.get(pk=order_id)
    saga = wait_for_saga(order.saga_id, timeout=60)
    order.refresh_from_db()
    return order, saga


# --- auth -----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_good_credentials_get_a_token_that_authenticates_the_user():
    user = a_user()
    user.set_password("s3cret-pass")
    user.save()

    response = APIClient().post("/api/auth/token/", {"username": "alice", "password": "s3cret-pass"}, format="json")

    assert response.status_code == 200, response.content
    assert response.json() == {"token": Token.objects.get(user=user).key}
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {response.json()['token']}")
    assert client.get("/api/products/").status_code == 200


@pytest.mark.django_db
def test_bad_credentials_get_a_400_json_error_and_no_token():
    user = a_user()
    user.set_password("s3cret-pass")
    user.save()

    response = APIClient().post("/api/auth/token/", {"username": "alice", "password": "wrong"}, format="json")

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert "non_field_errors" in response.json()
    assert not Token.objects.exists()


# --- products -------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_catalogue_lists_prices_as_decimal_strings_and_the_units_still_available():
    chair = a_product("CHAIR", price="49.90", on_hand=10)
    a_product("TABLE", price="120.00", on_hand=0)
    stock_reserve(saga_id=uuid.uuid4(), order_id=uuid.uuid4(), quantities={chair.pk: 3}, now=timezone.now())

    response = api_as(a_user()).get("/api/products/")

    assert response.status_code == 200
    assert response.json()["count"] == 2
    assert response.json()["results"] == [
        {"sku": "CHAIR", "name": "Product CHAIR", "price": "49.90", "currency": "EUR", "available": 7},
        {"sku": "TABLE", "name": "Product TABLE", "price": "120.00", "currency": "EUR", "available": 0},
    ]


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/products/", ORDERS, f"{ORDERS}{uuid.uuid4()}/"])
def test_an_anonymous_caller_gets_401_with_a_json_body(path):
    response = APIClient().get(path)

    assert response.status_code == 401
    assert "detail" in response.json()
    assert response["WWW-Authenticate"].startswith("Token")


@pytest.mark.django_db
def test_an_anonymous_caller_cannot_place_an_order():
    a_product()

    response = place(APIClient(), an_order_body())

    assert response.status_code == 401
    assert not Order.objects.exists()


# --- placing an order -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_placing_an_order_answers_201_with_the_order_priced_by_the_server_and_its_saga():
    alice, bob = a_user("alice"), a_user("bob")
    a_product("SKU-1", price="10.00")
    a_product("SKU-2", price="2.50")
    body = {
        "items": [{"sku": "SKU-1", "quantity": 2}, {"sku": "SKU-2", "quantity": 3}],
        "payment_method": "pm_ok",
        "total": "0.01",
        "status": "confirmed",
        "owner": bob.pk,
    }

    response = place(api_as(alice), body)

    assert response.status_code == 201, response.content
    data = response.json()
    order = Order.objects.get()
    assert data["id"] == str(order.id)
    assert response["Location"] == f"/api/orders/{order.id}/"
    assert (data["status"], data["total"], data["currency"]) == ("pending", "27.50", "EUR")
    assert (order.owner, order.status, order.total) == (alice, OrderStatus.PENDING, Decimal("27.50"))
    assert data["items"] == [
        {"sku": "SKU-1", "quantity": 2, "unit_price": "10.00", "line_total": "20.00"},
        {"sku": "SKU-2", "quantity": 3, "unit_price": "2.50", "line_total": "7.50"},
    ]
    assert data["saga"]["id"] == str(order.saga_id)
    assert data["saga"]["state"] == SagaState.PENDING
    assert [s["name"] for s in data["saga"]["steps"]] == [
        "create_order", "reserve_inventory", "process_payment", "notify_fulfillment"
    ]
    assert "Idempotent-Replayed" not in response


@pytest.mark.django_db
def test_an_idempotency_key_of_255_characters_is_accepted():
    a_product()

    response = place(api_as(a_user()), an_order_body(), key="k" * 255)

    assert response.status_code == 201, response.content


BAD_INPUTS = {
    "unknown sku": (an_order_body(sku="NO-SUCH-SKU"), "items"),
    "sku with a NUL character": (an_order_body(sku="SKU\x001"), "items"),
    "sku over 64 characters": (an_order_body(sku="S" * 65), "items"),
    "sku not a string": (an_order_body(sku={"sku": "SKU-1"}), "items"),
    "quantity 0": (an_order_body(quantity=0), "items"),
    "negative quantity": (an_order_body(quantity=-1), "items"),
    "fractional quantity": (an_order_body(quantity=2.5), "items"),
    "quantity as a float": (an_order_body(quantity=2.0), "items"),
    "quantity null": (an_order_body(quantity=None), "items"),
    "quantity as a string": (an_order_body(quantity="2"), "items"),
    "quantity as a boolean": (an_order_body(quantity=True), "items"),
    "quantity over 1000": (an_order_body(quantity=1001), "items"),
    "quantity missing": ({"items": [{"sku": "SKU-1"}], "payment_method": "pm_ok"}, "items"),
    "empty items": ({"items": [], "payment_method": "pm_ok"}, "items"),
    "101 items": ({"items": [{"sku": f"S-{i}", "quantity": 1} for i in range(101)], "payment_method": "pm_ok"}, "items"),
    "duplicate skus": (
        {"items": [{"sku": "SKU-1", "quantity": 1}, {"sku": "SKU-1", "quantity": 2}], "payment_method": "pm_ok"},
        "items",
    ),
    "items not a list": ({"items": {"sku": "SKU-1", "quantity": 1}, "payment_method": "pm_ok"}, "items"),
    "an item not an object": ({"items": ["SKU-1"], "payment_method": "pm_ok"}, "items"),
    "items missing": ({"payment_method": "pm_ok"}, "items"),
    "unknown payment method": (an_order_body(payment_method="pm_bitcoin"), "payment_method"),
    "payment method missing": ({"items": [{"sku": "SKU-1", "quantity": 1}]}, "payment_method"),
    "unknown flow": (an_order_body(flow="telepathic"), "flow"),
    "body not an object": ([an_order_body()], "non_field_errors"),
}


@pytest.mark.django_db
@pytest.mark.parametrize("body, field", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_order_input_gets_a_400_naming_the_field_and_places_nothing(body, field):
    a_product("SKU-1")

    response = place(api_as(a_user()), body)

    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert not Order.objects.exists()
    assert not IdempotencyRecord.objects.exists()


@pytest.mark.django_db
def test_items_in_different_currencies_get_a_400_naming_items():
    a_product("SKU-1")
    product_create(sku="SKU-USD", name="Dollar thing", price=Decimal("5.00"), currency="USD", on_hand=5)
    body = {"items": [{"sku": "SKU-1", "quantity": 1}, {"sku": "SKU-USD", "quantity": 1}], "payment_method": "pm_ok"}

    response = place(api_as(a_user()), body)

    assert response.status_code == 400
    assert "currency" in response.json()["items"][0]
    assert not Order.objects.exists()


@pytest.mark.django_db
def test_an_order_whose_total_is_too_large_to_record_gets_a_400_naming_items():
    a_product("YACHT", price="9999999999.99")

    response = place(api_as(a_user()), an_order_body(sku="YACHT", quantity=2))

    assert response.status_code == 400, response.content
    assert "total" in response.json()["items"][0]
    assert not Order.objects.exists()
    assert not IdempotencyRecord.objects.exists()


@pytest.mark.django_db
def test_a_key_refused_for_bad_input_can_be_used_again_with_good_input():
    a_product("SKU-1")
    client = api_as(a_user())
    assert place(client, an_order_body(sku="NO-SUCH-SKU"), key="retry-me").status_code == 400

    response = place(client, an_order_body(), key="retry-me")

    assert response.status_code == 201, response.content


@pytest.mark.django_db
def test_malformed_json_gets_a_400_json_error():
    a_product()

    response = api_as(a_user()).post(
        ORDERS, data='{"items": [', content_type="application/json", headers={"Idempotency-Key": "k"}
    )

    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]
    assert not Order.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "data, content_type",
    [
        ("items=SKU-1&payment_method=pm_ok", "application/x-www-form-urlencoded"),
        ('{"items": [{"sku": "SKU-1", "quantity": 1}], "payment_method": "pm_ok"}', "text/plain"),
    ],
    ids=["form-encoded", "text/plain"],
)
def test_a_body_that_is_not_json_gets_415(data, content_type):
    a_product()

    response = api_as(a_user()).post(ORDERS, data=data, content_type=content_type, headers={"Idempotency-Key": "k"})

    assert response.status_code == 415
    assert content_type in response.json()["detail"]
    assert not Order.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "headers", [{}, {"Idempotency-Key": "   "}, {"Idempotency-Key": "k" * 256}], ids=["missing", "blank", "256 chars"]
)
def test_a_missing_or_over_long_idempotency_key_gets_a_400_naming_the_header(headers):
    a_product()

    response = api_as(a_user()).post(ORDERS, an_order_body(), format="json", headers=headers)

    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()
    assert not Order.objects.exists()


# --- idempotency ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_same_key_and_body_replays_the_first_order():
    a_product()
    client = api_as(a_user())
    first = place(client, an_order_body(), key="once")

    again = place(client, an_order_body(), key="once")

    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json()["id"] == first.json()["id"]
    assert again["Idempotent-Replayed"] == "true"
    assert again["Location"] == first["Location"]
    assert Order.objects.count() == 1


@pytest.mark.django_db
def test_the_same_key_with_a_different_body_gets_422_and_no_second_order():
    a_product()
    client = api_as(a_user())
    place(client, an_order_body(quantity=2), key="once")

    response = place(client, an_order_body(quantity=3), key="once")

    assert response.status_code == 422
    assert "Idempotency-Key" in response.json()
    assert Order.objects.count() == 1


@pytest.mark.django_db
def test_idempotency_keys_are_scoped_to_the_user():
    a_product()
    alice, bob = a_user("alice"), a_user("bob")
    alices = place(api_as(alice), an_order_body(), key="shared")

    bobs = place(api_as(bob), an_order_body(), key="shared")

    assert (alices.status_code, bobs.status_code) == (201, 201)
    assert bobs.json()["id"] != alices.json()["id"]
    assert "Idempotent-Replayed" not in bobs
    assert Order.objects.get(pk=bobs.json()["id"]).owner == bob


@pytest.mark.django_db
def test_the_same_key_while_the_first_request_is_in_flight_gets_409():
    a_product()
    alice = a_user()
    body = an_order_body()
    fingerprint = _fingerprint([LineRequest("SKU-1", 2)], "pm_ok", "orchestrated")
    _claim_key(owner=alice, key="busy", fingerprint=fingerprint, now=timezone.now())  # a request that has not finished

    response = place(api_as(alice), body, key="busy")

    assert response.status_code == 409
    assert "Idempotency-Key" in response.json()
    assert not Order.objects.exists()


@pytest.mark.services(reason="needs PostgreSQL for truly concurrent requests")
@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_with_the_same_key_place_one_order_and_the_others_get_409():
    a_product()
    alice = a_user()
    clients = [api_as(alice) for _ in range(20)]
    start = threading.Barrier(len(clients))
    answers = []

    def send(client):
        try:
            start.wait(timeout=30)
            response = place(client, an_order_body(), key="same")
            answers.append((response.status_code, response.json().get("id")))
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    order = Order.objects.get()
    assert len(answers) == len(clients)
    assert {code for code, _ in answers} <= {201, 409}, answers
    assert {order_id for code, order_id in answers if code == 201} == {str(order.id)}


@pytest.mark.django_db
def test_a_key_whose_first_request_died_long_ago_is_taken_over():
    a_product()
    alice = a_user()
    fingerprint = _fingerprint([LineRequest("SKU-1", 2)], "pm_ok", "orchestrated")
    _claim_key(owner=alice, key="orphan", fingerprint=fingerprint, now=timezone.now() - timedelta(minutes=5))

    response = place(api_as(alice), an_order_body(), key="orphan")

    assert response.status_code == 201, response.content
    assert IdempotencyRecord.objects.get(key="orphan").order_id == uuid.UUID(response.json()["id"])


# --- reading orders -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_order_list_shows_only_the_callers_orders_newest_first():
    a_product()
    alice, bob = a_user("alice"), a_user("bob")
    mine = [str(an_order(user=alice, key=f"a{i}").id) for i in range(3)]
    an_order(user=bob, key="b0")

    response = api_as(alice).get(ORDERS)

    assert response.status_code == 200
    data = response.json()
    assert [o["id"] for o in data["results"]] == mine[::-1]
    assert data["next"] is None and data["previous"] is None
    assert "count" not in data, "no total: it would count every order the customer ever placed"


@pytest.mark.django_db
def test_the_order_list_pages_by_cursor_through_every_order_once_even_when_they_share_a_timestamp(monkeypatch):
    from config.pagination import NewestFirstCursorPagination

    monkeypatch.setattr(NewestFirstCursorPagination, "page_size", 2)
    a_product()
    alice = a_user("alice")
    orders = [an_order(user=alice, key=f"a{i}") for i in range(7)]
    Order.objects.filter(pk__in=[o.pk for o in orders[2:5]]).update(created_at=orders[2].created_at)  # a tie
    expected = [str(o.id) for o in Order.objects.filter(owner=alice).order_by("-created_at", "-id")]
    client = api_as(alice)

    pages, url = [], ORDERS
    while url:
        page = client.get(url).json()
        pages.append([o["id"] for o in page["results"]])
        url = page["next"]
    back = client.get(client.get(ORDERS).json()["next"]).json()["previous"]

    assert [len(p) for p in pages] == [2, 2, 2, 1]
    assert sum(pages, []) == expected
    assert [o["id"] for o in client.get(back).json()["results"]] == pages[0]


@pytest.mark.parametrize("cursor", ["o=x", "o=-1", "p=not-a-date", "p=2026-13-01 00:00:00+00:00"])
@pytest.mark.django_db
def test_a_cursor_the_api_did_not_hand_out_is_a_404_json_error(cursor):
    encoded = base64.b64encode(cursor.encode()).decode()

    response = api_as(a_user()).get(ORDERS, {"cursor": encoded})

    assert response.status_code == 404
    assert response.json() == {"detail": "Invalid cursor"}


@pytest.mark.parametrize("orders", [1, 20])
@pytest.mark.django_db
def test_a_page_of_orders_costs_the_same_queries_whatever_its_size(orders):
    """Items, saga steps and events are read for the whole page at once: five queries (the
    token, the orders with their sagas, the items, the steps, the events), not five per order."""
    a_product(on_hand=1000)
    alice = a_user("alice")
    placed = [an_order(user=alice, key=f"a{i}") for i in range(orders)]
    for order in placed:
        runner.step_run(saga_id=order.saga_id, step_name="create_order", direction=FORWARD, republish=lambda: None)
    client = api_as(alice)

    with CaptureQueriesContext(connection) as queries:
        response = client.get(ORDERS)

    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == orders
    assert all(o["events"] and o["items"] and o["saga"]["steps"] for o in results), "each order shows its events, items and steps"
    assert len(queries) == 5, [q["sql"][:120] for q in queries.captured_queries]


@pytest.mark.django_db
def test_an_unknown_status_filter_gets_a_400_naming_status():
    response = api_as(a_user()).get(ORDERS, {"status": "bogus"})

    assert response.status_code == 400
    assert "status" in response.json()


@pytest.mark.django_db
def test_another_users_order_is_not_found_and_so_is_a_random_id():
    a_product()
    bobs = an_order(user=a_user("bob"))
    client = api_as(a_user("alice"))

    responses = [client.get(f"{ORDERS}{bobs.id}/"), client.get(f"{ORDERS}{uuid.uuid4()}/")]

    assert [r.status_code for r in responses] == [404, 404]
    assert all("detail" in r.json() for r in responses)
    assert api_as(a_user("bob")).get(f"{ORDERS}{bobs.id}/").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_the_status_filter_returns_only_orders_in_that_status(saga_worker):
    a_product()
    alice = a_user()
    client = api_as(alice)
    ok = place(client, an_order_body(), key="ok").json()["id"]
    declined = place(client, an_order_body(payment_method="pm_declined"), key="declined").json()["id"]
    finished(ok), finished(declined)

    confirmed = client.get(ORDERS, {"status": "confirmed"}).json()
    cancelled = client.get(ORDERS, {"status": "cancelled"}).json()

    assert [o["id"] for o in confirmed["results"]] == [ok]
    assert [o["id"] for o in cancelled["results"]] == [declined]
    assert client.get(ORDERS, {"status": "pending"}).json()["results"] == []


@pytest.mark.django_db(transaction=True)
def test_an_order_shows_its_saga_timeline_with_every_step_and_compensation(saga_worker):
    a_product()
    client = api_as(a_user())
    order_id = place(client, an_order_body(payment_method="pm_declined")).json()["id"]
    finished(order_id)

    data = client.get(f"{ORDERS}{order_id}/").json()

    assert data["status"] == "cancelled"
    assert data["cancel_reason"] == "card declined by the issuer"
    saga = data["saga"]
    assert saga["state"] == SagaState.COMPENSATED
    started = [(s["name"], s["direction"], s["state"]) for s in saga["steps"] if s["started_at"]]
    assert started == [
        ("create_order", Direction.FORWARD, StepState.COMPLETED),
        ("reserve_inventory", Direction.FORWARD, StepState.COMPLETED),
        ("process_payment", Direction.FORWARD, StepState.FAILED),
        ("reserve_inventory", Direction.COMPENSATE, StepState.COMPLETED),
        ("create_order", Direction.COMPENSATE, StepState.COMPLETED),
    ], timeline(saga["id"])
    payment = next(s for s in saga["steps"] if s["name"] == "process_payment")
    assert payment["attempts"] == 1
    assert payment["error"] == "card declined by the issuer"
    assert payment["finished_at"] >= payment["started_at"]
    never_ran = [s for s in saga["steps"] if not s["started_at"]]
    assert [(s["name"], s["state"]) for s in never_ran] == [("notify_fulfillment", StepState.PENDING)]


INTERNALS = re.compile(r"PaymentDeclined|GatewayTimeout|InjectedTransientError|Error:|\.py|line \d|/srv/|/work/")


@pytest.mark.django_db(transaction=True)
def test_a_customer_reads_the_business_reason_while_staff_keep_the_exception_and_where_it_was_raised(saga_worker):
    a_product()
    customer, staff = api_as(a_user()), api_as(an_operator())
    order_id = place(customer, an_order_body(payment_method="pm_declined")).json()["id"]
    _, saga = finished(order_id)

    as_customer = customer.get(f"{ORDERS}{order_id}/")
    as_staff = staff.get(f"/api/sagas/{saga.id}/").json()

    assert not INTERNALS.search(as_customer.content.decode()), as_customer.content
    assert as_customer.json()["cancel_reason"] == "card declined by the issuer"
    assert as_customer.json()["saga"]["failure_reason"] == "card declined by the issuer"
    cancelled = next(e for e in as_customer.json()["events"] if e["event_type"] == "ORDER_CANCELLED")
    assert cancelled["payload"]["reason"] == "card declined by the issuer"
    staff_payment = next(s for s in as_staff["steps"] if s["name"] == "process_payment" and s["direction"] == "forward")
    assert staff_payment["error"].startswith("PaymentDeclined: card declined by the issuer (at ")
    assert "gateway.py:" in staff_payment["error"]
    assert "PaymentDeclined" in as_staff["failure_reason"]


@pytest.mark.django_db(transaction=True)
def test_a_failure_that_is_not_a_business_refusal_reads_as_a_neutral_sentence_to_the_customer(saga_worker):
    a_product()
    inject_fault("place_order", "process_payment", kind="transient", times=None)  # every try: retries run out
    customer = api_as(a_user())
    order_id = place(customer, an_order_body()).json()["id"]
    order, saga = finished(order_id)
    assert saga.state == SagaState.COMPENSATED, timeline(saga.id)

    response = customer.get(f"{ORDERS}{order_id}/")

    assert not INTERNALS.search(response.content.decode()), response.content
    assert response.json()["cancel_reason"] == "the payment could not be completed"
    payment = next(s for s in response.json()["saga"]["steps"] if s["name"] == "process_payment")
    assert (payment["state"], payment["error"]) == (StepState.FAILED, "the payment could not be completed")
    assert "InjectedTransientError" in saga.steps.get(name="process_payment", direction=Direction.FORWARD).last_error


# --- cancelling -----------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_cancelling_a_pending_order_answers_202_then_cancels_it_and_gives_the_stock_back(saga_worker):
    product = a_product(on_hand=10)
    inject_fault("place_order", "process_payment", kind="transient", times=4)  # keeps the saga busy a few seconds
    client = api_as(a_user())
    order_id = place(client, an_order_body(quantity=3)).json()["id"]
    order = Order.objects.get(pk=order_id)
    wait_for_step(order.saga_id, "process_payment", StepState.RETRYING)
    assert Stock.objects.get(pk=product.pk).reserved == 3

    response = client.post(f"{ORDERS}{order_id}/cancel/")

    assert response.status_code == 202, response.content
    assert response.json()["status"] == "pending"
    order, saga = finished(order_id)
    assert (order.status, saga.state) == (OrderStatus.CANCELLED, SagaState.COMPENSATED), timeline(saga.id)
    assert "cancelled by the customer" in order.cancel_reason
    stock = Stock.objects.get(pk=product.pk)
    assert (stock.on_hand, stock.reserved) == (10, 0)
    assert not Payment.objects.exists()
    assert_shop_invariants()


@pytest.mark.django_db
def test_cancelling_an_order_whose_saga_has_not_started_cancels_it_at_once():
    a_product()
    client = api_as(a_user())
    order_id = place(client, an_order_body()).json()["id"]  # no commit here, so the saga never starts

    response = client.post(f"{ORDERS}{order_id}/cancel/")

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "cancelled"
    order = Order.objects.get(pk=order_id)
    assert (order.status, order.saga.state) == (OrderStatus.CANCELLED, SagaState.COMPENSATED)


@pytest.mark.django_db(transaction=True)
def test_cancelling_an_already_cancelled_order_answers_200_and_changes_nothing(saga_worker):
    a_product()
    client = api_as(a_user())
    order_id = place(client, an_order_body(payment_method="pm_declined")).json()["id"]
    before, _ = finished(order_id)

    response = client.post(f"{ORDERS}{order_id}/cancel/")

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "cancelled"
    after = Order.objects.get(pk=order_id)
    assert (after.cancel_reason, after.updated_at) == (before.cancel_reason, before.updated_at)


@pytest.mark.django_db(transaction=True)
def test_cancelling_a_confirmed_order_gets_409_and_leaves_it_confirmed(saga_worker):
    a_product()
    client = api_as(a_user())
    order_id = place(client, an_order_body()).json()["id"]
    order, saga = finished(order_id)
    assert order.status == OrderStatus.CONFIRMED, timeline(saga.id)

    response = client.post(f"{ORDERS}{order_id}/cancel/")

    assert response.status_code == 409
    assert "confirmed" in response.json()["detail"]
    order.refresh_from_db()
    assert order.status == OrderStatus.CONFIRMED
    assert SagaInstance.objects.get(pk=saga.id).state == SagaState.COMPLETED


@pytest.mark.django_db
def test_cancelling_another_users_order_is_not_found_and_leaves_it_alone():
    a_product()
    bobs = an_order(user=a_user("bob"))

    response = api_as(a_user("alice")).post(f"{ORDERS}{bobs.id}/cancel/")

    assert response.status_code == 404
    bobs.refresh_from_db()
    assert (bobs.status, bobs.saga.state) == (OrderStatus.PENDING, SagaState.PENDING)


# --- CSRF and throttling --------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_session_authenticated_post_without_a_csrf_token_is_refused_with_403_json():
    a_product()
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(a_user())

    response = place(client, an_order_body())

    assert response.status_code == 403
    assert "CSRF" in response.json()["detail"]
    assert not Order.objects.exists()


@pytest.mark.django_db
def test_a_session_authenticated_post_with_the_csrf_token_is_accepted():
    a_product()
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(a_user())
    csrf = secrets.token_hex(16)
    client.cookies["csrftoken"] = csrf

    response = client.post(ORDERS, an_order_body(), format="json", headers={"Idempotency-Key": "k", "X-CSRFToken": csrf})

    assert response.status_code == 201, response.content


@pytest.fixture
def low_throttle_rates(settings, monkeypatch):
    """3 requests a minute, counted in a cache of this test's own (not the shared Redis)."""
    rates = {"anon": "3/min", "user": "3/min"}
    own_cache = {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": f"throttle-{uuid.uuid4()}"}
    settings.CACHES = {"default": own_cache}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": rates}
    monkeypatch.setattr(SimpleRateThrottle, "THROTTLE_RATES", rates)  # read once, at import
    return rates


@pytest.mark.django_db
def test_a_user_over_the_rate_limit_gets_429_with_a_json_detail(low_throttle_rates):
    client = api_as(a_user())
    allowed = [client.get("/api/products/").status_code for _ in range(3)]

    response = client.get("/api/products/")

    assert allowed == [200, 200, 200]
    assert response.status_code == 429
    assert "throttled" in response.json()["detail"]
    assert int(response["Retry-After"]) > 0
    assert api_as(a_user("bob")).get("/api/products/").status_code == 200, "each user has a budget of their own"


# --- staff saga endpoints -------------------------------------------------------------------------

SAGA_ENDPOINTS = [
    ("get", "/api/sagas/"),
    ("get", "/api/sagas/{id}/"),
    ("post", "/api/sagas/{id}/retry/"),
    ("post", "/api/sagas/{id}/abort/"),
]


@pytest.mark.django_db
@pytest.mark.parametrize("method, path", SAGA_ENDPOINTS)
def test_the_saga_endpoints_refuse_a_non_staff_user_with_403_and_an_anonymous_caller_with_401(method, path):
    a_product()
    order = an_order()
    url = path.format(id=order.saga_id)

    as_customer = getattr(api_as(a_user("alice")), method)(url)
    as_anonymous = getattr(APIClient(), method)(url)

    assert (as_customer.status_code, as_anonymous.status_code) == (403, 401)
    assert "detail" in as_customer.json() and "detail" in as_anonymous.json()
    assert SagaInstance.objects.get(pk=order.saga_id).state == SagaState.PENDING


@pytest.mark.django_db
def test_staff_can_list_and_inspect_sagas():
    a_product()
    order = an_order()
    staff = api_as(an_operator())

    listing = staff.get("/api/sagas/")
    detail = staff.get(f"/api/sagas/{order.saga_id}/")

    assert listing.status_code == 200
    assert [s["id"] for s in listing.json()["results"]] == [str(order.saga_id)]
    assert detail.status_code == 200
    assert (detail.json()["name"], detail.json()["state"]) == ("place_order", SagaState.PENDING)
    assert len(detail.json()["steps"]) == 4
    assert staff.get(f"/api/sagas/{uuid.uuid4()}/").status_code == 404


@pytest.mark.django_db
def test_an_unknown_saga_state_filter_gets_a_400_naming_state():
    response = api_as(an_operator()).get("/api/sagas/", {"state": "bogus"})

    assert response.status_code == 400
    assert "state" in response.json()


@pytest.mark.django_db
def test_retrying_a_saga_that_has_not_failed_gets_409():
    a_product()
    order = an_order()

    response = api_as(an_operator()).post(f"/api/sagas/{order.saga_id}/retry/")

    assert response.status_code == 409
    assert "FAILED" in response.json()["detail"]
    assert SagaInstance.objects.get(pk=order.saga_id).state == SagaState.PENDING


@pytest.mark.django_db
def test_aborting_a_running_saga_answers_202_and_it_compensates():
    a_product()
    order = an_order()

    response = api_as(an_operator()).post(f"/api/sagas/{order.saga_id}/abort/")

    assert response.status_code == 202, response.content
    assert response.json()["state"] in (SagaState.COMPENSATING, SagaState.COMPENSATED)
    saga = SagaInstance.objects.get(pk=order.saga_id)
    assert saga.state in (SagaState.COMPENSATING, SagaState.COMPENSATED)
    assert saga.failure_reason == "aborted by ops"


@pytest.mark.django_db
def test_retrying_or_aborting_an_unknown_saga_is_not_found():
    staff = api_as(an_operator())

    responses = [staff.post(f"/api/sagas/{uuid.uuid4()}/retry/"), staff.post(f"/api/sagas/{uuid.uuid4()}/abort/")]

    assert [r.status_code for r in responses] == [404, 404]


@pytest.mark.django_db(transaction=True)
def test_aborting_a_completed_saga_gets_409(saga_worker):
    a_product()
    order, saga = finished(an_order().id)
    assert saga.state == SagaState.COMPLETED, timeline(saga.id)

    response = api_as(an_operator()).post(f"/api/sagas/{saga.id}/abort/")

    assert response.status_code == 409
    assert "COMPLETED" in response.json()["detail"]
    assert SagaInstance.objects.get(pk=saga.id).state == SagaState.COMPLETED


@pytest.fixture
def an_order_whose_undo_failed(saga_worker):
    """A declined order whose cancel-order compensation fails once: its saga ends FAILED."""
    a_product()
    inject_fault("place_order", "create_order", kind="business", direction=Direction.COMPENSATE)
    order, saga = finished(an_order(payment_method="pm_declined").id)
    assert saga.state == SagaState.FAILED, timeline(saga.id)
    return order


@pytest.mark.django_db(transaction=True)
def test_staff_find_failed_sagas_by_state_and_retry_them_to_the_end(an_order_whose_undo_failed):
    order = an_order_whose_undo_failed
    confirmed, _ = finished(an_order(key="another").id)
    staff = api_as(an_operator())

    failed = staff.get("/api/sagas/", {"state": "FAILED"})
    retried = staff.post(f"/api/sagas/{order.saga_id}/retry/")

    assert [s["id"] for s in failed.json()["results"]] == [str(order.saga_id)]
    assert retried.status_code == 202, retried.content
    assert retried.json()["state"] == SagaState.COMPENSATING
    order, saga = finished(order.id)
    assert (saga.state, order.status) == (SagaState.COMPENSATED, OrderStatus.CANCELLED), timeline(saga.id)
    assert_shop_invariants()


@pytest.mark.django_db(transaction=True)
def test_cancelling_an_order_whose_undo_failed_gets_409_until_an_operator_steps_in(an_order_whose_undo_failed):
    order = an_order_whose_undo_failed

    response = api_as(order.owner).post(f"{ORDERS}{order.id}/cancel/")

    assert response.status_code == 409
    assert "operator" in response.json()["detail"]
    assert SagaInstance.objects.get(pk=order.saga_id).state == SagaState.FAILED


# --- health and schema ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_health_tells_the_public_only_its_status():
    response = APIClient().get("/api/health/")

    assert response.status_code == 200
    assert set(response.json()) == {"status"}
    assert response.json()["status"] in ("ok", "degraded")


@pytest.fixture
def unreachable_broker(settings, monkeypatch, tmp_path):
    """Point the Celery app at a broker that cannot be reached (the env var wins over conf)."""
    from config.celery import app

    if settings.CELERY_BROKER_URL.startswith("redis"):
        url = "redis://127.0.0.1:1/0"
    else:
        url = f"sqla+sqlite:///{tmp_path}/no-such-dir/broker.sqlite3"
    monkeypatch.setenv("CELERY_BROKER_URL", url)
    monkeypatch.setitem(app.conf, "broker_url", url)
    return url


@pytest.mark.django_db
def test_health_answers_503_down_when_the_broker_is_unreachable_and_names_no_host(unreachable_broker):
    response = APIClient().get("/api/health/")

    assert response.status_code == 503 and response["Retry-After"]
    assert response.json() == {"status": "down"}
    staff = APIClient()
    staff.force_login(an_operator(), backend="django.contrib.auth.backends.ModelBackend")  # as the admin's login
    details = staff.get("/api/health/").json()
    assert details["checks"]["database"] == "ok" and details["checks"]["broker"].startswith("error")
    assert "127.0.0.1" not in json.dumps(details) and ":1/" not in json.dumps(details)


@pytest.mark.django_db
def test_the_openapi_schema_describes_the_order_api_without_auth():
    response = APIClient().get("/api/schema/")

    assert response.status_code == 200
    schema = yaml.safe_load(response.content)
    assert schema["openapi"].startswith("3.")
    assert {"/api/orders/", "/api/orders/{order_id}/cancel/", "/api/sagas/", "/api/health/"} <= set(schema["paths"])
    headers = [p["name"] for p in schema["paths"]["/api/orders/"]["post"]["parameters"] if p["in"] == "header"]
    assert headers == ["Idempotency-Key"]


@pytest.mark.django_db
def test_the_interactive_docs_are_served_as_html_without_auth():
    response = APIClient().get("/api/docs/")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    assert b"swagger-ui" in response.content



# --- gaps closed after review ----------------------------------------------------------------


@pytest.mark.django_db
def test_a_staff_abort_before_the_saga_started_leaves_the_order_cancelled_not_pending():
    a_product()
    order = an_order()  # the saga's first message is never consumed: no worker in this test

    response = api_as(an_operator()).post(f"/api/sagas/{order.saga_id}/abort/")

    assert response.status_code == 202, response.content
    order.refresh_from_db()
    assert (order.saga.state, order.status) == (SagaState.COMPENSATED, OrderStatus.CANCELLED)
    assert order.saga.failure_reason == "aborted by ops", "staff see which operator"
    assert order.cancel_reason == "cancelled by our support team", "the customer does not"


@pytest.mark.django_db
def test_aborting_a_failed_saga_answers_409_saying_to_retry_its_compensation():
    from sagas.tests.builders import failed_saga

    saga = failed_saga()

    response = api_as(an_operator()).post(f"/api/sagas/{saga.id}/abort/")

    assert response.status_code == 409
    assert "FAILED" in response.json()["detail"] and "retry the compensation" in response.json()["detail"]
    assert SagaInstance.objects.get(pk=saga.pk).state == SagaState.FAILED


@pytest.mark.django_db
def test_a_choreographed_order_has_no_saga_shows_its_events_and_cannot_be_cancelled_in_flight():
    a_product()
    client = api_as(a_user())

    response = place(client, an_order_body(flow="choreographed"))
    order_id = response.json()["id"]
    cancel = client.post(f"/api/orders/{order_id}/cancel/")

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["flow"], body["saga"]) == ("choreographed", None)
    assert [e["event_type"] for e in body["events"]] == ["ORDER_CREATED"]
    assert cancel.status_code == 409 and "choreographed" in cancel.json()["detail"]
    assert Order.objects.get(pk=order_id).status == OrderStatus.PENDING


@pytest.mark.django_db
def test_password_guessing_on_the_token_endpoint_is_throttled(low_throttle_rates):
    a_user()
    attempts = [
        api_as().post("/api/auth/token/", {"username": "alice", "password": f"guess-{n}"}, format="json").status_code
        for n in range(4)
    ]

    assert attempts == [400, 400, 400, 429]


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/api/orders/not-a-uuid/", "/api/no-such-endpoint/"])
def test_an_unknown_api_path_gets_a_json_404(path):
    response = api_as(a_user()).get(path)

    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}
