"""The hostile inputs of issue 10 (finding 3) sent over real sockets to the servers the project
runs: Django's runserver (`make run`) and gunicorn (the image). The WSGI server sits in front of
Django here, so what it lets through (runserver passes a NUL in a header on) is tested too."""

import http.client
import json
import socket
import subprocess
import sys
import time

import pytest
from django.conf import settings
from rest_framework.authtoken.models import Token

from sagas.testing import subprocess_environment
from tests.orders_helpers import a_product, a_user

pytestmark = pytest.mark.django_db(transaction=True)  # the server process must see the rows

ORDER = json.dumps({"items": [{"sku": "SKU-1", "quantity": 1}], "payment_method": "pm_ok"})
DEEP = "[" * 1100 + "]" * 1100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVERS = {
    "runserver": lambda port: [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
    "gunicorn": lambda port: [sys.executable, "-m", "gunicorn", "config.wsgi:application", "--bind", f"127.0.0.1:{port}", "--workers", "1"],
}


@pytest.fixture(params=sorted(SERVERS))
def server(request):
    port = free_port()
    process = subprocess.Popen(
        SERVERS[request.param](port), cwd=settings.BASE_DIR, env=subprocess_environment(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{request.param} did not start on port {port}")
            time.sleep(0.1)
    yield port
    process.terminate()
    process.wait(timeout=10)


def send(port, path, body, headers):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest("POST", path)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
            connection.putheader(name, value)
        connection.endheaders()
        try:
            connection.send(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before reading the whole body: its answer is what counts
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def test_the_attackers_inputs_get_a_4xx_json_answer_from_runserver_and_gunicorn(server):
    a_product()
    token = Token.objects.create(user=a_user()).key
    customer = {"Authorization": f"Token {token}", "Idempotency-Key": "live"}
    inputs = {
        "deep JSON, orders": ("/api/orders/", DEEP, customer, 400),
        "deep JSON, token": ("/api/auth/token/", DEEP, {}, 400),
        "lone surrogate, orders": ("/api/orders/", ORDER.replace('"pm_ok"', '"\\ud800"'), customer, 400),
        "lone surrogate, token": ("/api/auth/token/", '{"username": "\\ud800", "password": "x"}', {}, 400),
        "3 MB body, orders": ("/api/orders/", json.dumps({"x": "a" * 3_000_000}), customer, 413),
        "3 MB body, token": ("/api/auth/token/", json.dumps({"username": "a" * 3_000_000}), {}, 413),
        "NUL in Idempotency-Key": ("/api/orders/", ORDER, {**customer, "Idempotency-Key": "k\x00"}, 400),
    }
    answers = {}

    for name, (path, body, headers, _) in inputs.items():
        answers[name] = send(server, path, body.encode("utf-8", "surrogatepass"), headers)

    for name, (status, content_type, content) in answers.items():
        assert status == inputs[name][3], (name, status, content[:200])
        if b"Invalid HTTP Header" in content:
            assert name == "NUL in Idempotency-Key", "gunicorn itself refuses such a header, in its own format"
        else:
            assert content_type.startswith("application/json") and "detail" in json.loads(content), (name, content[:200])
