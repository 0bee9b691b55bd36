"""The chaos soak's web tier and the client that calls it through every outage.

`WebTier` runs gunicorn on the soak's private services with the production settings, as
docker-compose.yml does (perf.chaos_wsgi: config.wsgi, plus place_order v2 once the soak deployed
it; `redeploy` starts a new instance and switches the clients to it, blue/green). `ApiClient` calls it
from threads of its own for the whole placing window: health once a second and the orders lists
a few times a second, its share of the orders (POST /api/orders/ with an Idempotency-Key, the same key again on a
503, 409 or 429), and the operator's staff actions. Every answer is kept (`Answer`), and
`web_violations` judges them: an outage must reach a client as a JSON 503 with Retry-After within
5 s (DESIGN.md rule 15), never as another 5xx, a hang or no answer.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from perf.common import REPO
from perf.services import free_port

WITHIN = 5.0  # seconds: the longest any answer may take, outage or not
NO_ANSWER_AFTER = 15.0  # the client's own timeout: a request still unanswered then is a hang
GIVE_UP_AFTER = 240.0  # an order the web tier would not take for this long is given up (a violation)


class WebTier:
    """gunicorn serving the app on a free port of 127.0.0.1, its log in `root`/gunicorn.log."""

    # As many workers as the soak calls it from threads at once (two readers, the placer, the
    # operator), so no request waits for a free worker: what the answers measure is an outage's
    # cost, not the queue in front of two workers that each hold a request for up to 4 s.
    def __init__(self, env: dict[str, str], root: Path, *, workers: int = 4):
        self.env, self.workers = env, workers
        self.log = root / "gunicorn.log"
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.retiring: threading.Thread | None = None  # the instance a redeploy replaced, stopping

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> WebTier:
        self.port, self.process = self._spawn()
        return self

    def _spawn(self, timeout: float = 60.0) -> tuple[int, subprocess.Popen]:
        """A gunicorn on a new port, once it answers."""
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "perf.chaos_wsgi:application", f"--bind=127.0.0.1:{port}",
             f"--workers={self.workers}", "--timeout=30", "--graceful-timeout=20", "--access-logfile=-"],
            cwd=REPO, env=self.env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while _request(port, "GET", "/api/health/", timeout=5)[0] is None:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"gunicorn did not answer on port {port}; see {self.log}")
            time.sleep(0.2)
        return port, process

    def redeploy(self) -> int:
        """Blue/green, as a load balancer in front of two instances does it: a new gunicorn (it
        loads the deploy's code) on another port; once it answers, clients are sent to it and the
        old one finishes the requests it holds and stops (in the background). No request finds no
        server. Returns the seconds until the new one answered."""
        old = self.process
        started = time.monotonic()
        self.port, self.process = self._spawn()
        self.retiring = threading.Thread(target=self._retire, args=(old,), name="chaos-web-retire", daemon=True)
        self.retiring.start()
        return time.monotonic() - started

    @staticmethod
    def _retire(process: subprocess.Popen) -> None:
        process.terminate()  # gunicorn's graceful stop: the requests in hand are answered first
        try:
            process.wait(25)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.retiring is not None:
            self.retiring.join(timeout=30)
        if not self.alive:
            return
        self.process.terminate()
        try:
            self.process.wait(25)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@dataclass
class Answer:
    """One request as the client saw it."""

    at: float  # seconds after the placing phase started
    took: float
    method: str
    path: str
    status: int | None  # None: no answer (refused, reset, or nothing within NO_ANSWER_AFTER)
    json: bool = False  # the body parsed as JSON
    retry_after: bool = False  # a Retry-After header came with it
    detail: str = ""  # the error, or the start of a 5xx body


def _request(port: int, method: str, path: str, body=None, *, headers: dict | None = None, timeout: float = NO_ANSWER_AFTER):
    """(status or None, parsed JSON or None, headers, error text)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, json.dumps(body) if body is not None else None,
                           {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        raw = response.read()
    except OSError as exc:
        return None, None, {}, f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    return response.status, parsed, dict(response.getheaders()), raw[:200].decode(errors="replace")


class ApiClient:
    """Calls the web tier from threads of its own while the soak places orders (see the module)."""

    def __init__(self, web: WebTier, *, customer_token: str, staff_token: str, t0: float):
        self.web, self.customer_token, self.staff_token, self.t0 = web, customer_token, staff_token, t0
        self.answers: list[Answer] = []  # appended from several threads (list.append is atomic)
        self.placed: dict[str, str] = {}  # idempotency key -> order id
        self.given_up: list[str] = []
        self.submitted = 0
        self.stopping = threading.Event()
        self._new: queue.Queue = queue.Queue()
        self._due: list = []  # [(due, tries, first try, request)] of orders to try again
        self.threads = [
            threading.Thread(target=self._read_loop, args=(paths,), name=f"chaos-api-{name}", daemon=True)
            for name, paths in (("health", ["/api/health/"]), ("lists", ["/api/orders/", "/api/orders/?status=pending"]))
        ] + [threading.Thread(target=self._place_loop, name="chaos-api-placer", daemon=True)]

    def call(self, method: str, path: str, body=None, *, token: str | None = None, key: str | None = None) -> tuple[Answer, object]:
        headers = {"Authorization": f"Token {token}"} if token else {}
        if key:
            headers["Idempotency-Key"] = key
        started = time.monotonic()
        status, parsed, response_headers, text = _request(self.web.port, method, path, body, headers=headers)
        answer = Answer(
            at=round(started - self.t0, 2), took=round(time.monotonic() - started, 3), method=method, path=path.split("?")[0],
            status=status, json=parsed is not None, retry_after=bool(response_headers.get("Retry-After")),
            detail=text if status is None or status >= 500 else "",
        )
        self.answers.append(answer)
        return answer, parsed

    def start(self) -> ApiClient:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=30)

    # --- reading, throughout ---------------------------------------------------------------------

    def _read_loop(self, paths: list[str]) -> None:
        # The health throttle allows 2 a second per address: health once a second, the lists more often.
        pause = 1.0 if paths == ["/api/health/"] else 0.3
        n = 0
        while not self.stopping.wait(pause):
            path = paths[n % len(paths)]
            self.call("GET", path, token=None if path == "/api/health/" else self.customer_token)
            n += 1

    # --- placing its share of the orders ----------------------------------------------------------

    def place(self, request) -> None:
        """Place `request` (perf.chaos.Request) through POST /api/orders/, as a careful client does:
        on a 503, a 409 (the key still in flight), a 429 or no answer, the same key again later,
        with backoff, while the next orders go on."""
        self.submitted += 1
        self._new.put(request)

    @property
    def placing(self) -> int:
        """Orders handed to `place` and neither taken nor given up yet."""
        return self.submitted - len(self.placed) - len(self.given_up)

    def _place_loop(self) -> None:
        while not self.stopping.is_set():
            now = time.monotonic()
            due = next((entry for entry in self._due if entry[0] <= now), None)
            if due is not None:
                self._due.remove(due)
                self._try(*due[1:])
                continue
            try:
                request = self._new.get(timeout=0.02)
            except queue.Empty:
                continue
            self._try(0, now, request)

    def _try(self, tries: int, first: float, request) -> None:
        body = {"items": [{"sku": line.sku, "quantity": line.quantity} for line in request.lines],
                "payment_method": request.payment_method, "flow": request.flow}
        answer, order = self.call("POST", "/api/orders/", body, token=self.customer_token, key=request.key)
        if answer.status in (200, 201) and isinstance(order, dict) and "id" in order:
            self.placed[request.key] = order["id"]
            return
        retry = answer.status is None or answer.status in (409, 429) or answer.status >= 500
        if not retry or time.monotonic() - first > GIVE_UP_AFTER:
            self.given_up.append(f"{request.key} through the API: {answer.status} {answer.detail or order}")
            return
        tries += 1
        self._due.append((time.monotonic() + min(10.0, 0.25 * 2 ** tries) * random.uniform(0.5, 1.0), tries, first, request))

    # --- the operator, through the staff API -------------------------------------------------------

    def saga_action(self, saga_id, action: str, *, tries: int = 3) -> int | None:
        """POST /api/sagas/<id>/<action>/ (abort, retry) as staff, again after a 503 or no answer
        (both actions may be repeated); the last answer's status."""
        for attempt in range(tries):
            answer, _ = self.call("POST", f"/api/sagas/{saga_id}/{action}/", token=self.staff_token)
            if answer.status not in (None, 503) or attempt == tries - 1:
                return answer.status
            time.sleep(1.0)

    def summary(self) -> dict:
        statuses: dict[str, int] = {}
        for a in self.answers:
            statuses[str(a.status)] = statuses.get(str(a.status), 0) + 1
        return {
            "requests": len(self.answers),
            "by_status": dict(sorted(statuses.items())),
            "slowest_s": max((a.took for a in self.answers), default=0.0),
            "orders_placed_through_the_api": len(self.placed),
        }

    def records(self) -> list[dict]:
        return [asdict(a) for a in self.answers]


def web_violations(answers: list[Answer], outages: list[tuple[str, float, float]], *, within: float = WITHIN) -> list[str]:
    """What a client must never see (rule 15): no answer, a 5xx other than 503, a 503 that is not
    JSON with Retry-After, an answer slower than `within` seconds. And each outage (name, start,
    end in seconds) must have had a request in flight during it, or it was not tried."""
    violations = []
    for a in answers:
        where = f"{a.method} {a.path} at {a.at:.1f} s"
        if a.status is None:
            violations.append(f"{where}: no answer after {a.took:.1f} s ({a.detail})")
        elif a.status >= 500 and a.status != 503:
            violations.append(f"{where}: {a.status} {a.detail[:120]}")
        elif a.status == 503 and not (a.json and a.retry_after):
            violations.append(f"{where}: 503 without {'a JSON body' if not a.json else 'Retry-After'}")
        if a.status is not None and a.took > within:
            violations.append(f"{where}: answered {a.status} after {a.took:.1f} s (more than {within:g} s)")
    for name, start, end in outages:
        if not any(a.at <= end and a.at + a.took >= start for a in answers):
            violations.append(f"no request was in flight during {name} ({start:.1f}-{end:.1f} s)")
    return violations
