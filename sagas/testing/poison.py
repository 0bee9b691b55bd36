"""Messages no worker can run (DESIGN.md rule 12), for tests and the chaos soak: envelopes that are
not JSON, bodies of the wrong shape, unknown tasks, pickles, arguments that do not fit a task.

    tokens = send_poison(settings.CELERY_BROKER_URL, queue, marker=uuid.uuid4().hex)

Each message carries its own token, `<marker>-<kind>`, and the RejectedMessage a worker records for
it contains that token (in the body or the headers it keeps), so a caller can tell which of the
messages it sent were recorded, and how many times.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass

__all__ = ["Poison", "send_poison", "task_messages"]


@dataclass(frozen=True)
class Poison:
    """One message as a broker carries it: headers, body and content type (a task message that
    Celery can take off the queue but not run)."""

    kind: str
    token: str
    headers: dict
    body: str
    content_type: str = "application/json"


def task_headers(task: str, task_id: str, **extra) -> dict:
    return {"lang": "py", "task": task, "id": task_id, "retries": 0, "root_id": task_id, "parent_id": None,
            "argsrepr": "", "kwargsrepr": "", "origin": "attacker", "ignore_result": True, **extra}


def task_messages(marker: str) -> list[Poison]:
    """Task messages no worker can run; their tokens are `<marker>-<kind>`, none a prefix of another."""
    saga = str(uuid.uuid4())

    def poison(kind: str, slug: str, task: str, body: str, content_type: str = "application/json") -> Poison:
        token = f"{marker}-{slug}"
        return Poison(kind, token, task_headers(task, token), body, content_type)

    return [
        poison("body of the wrong shape", "shape", "sagas.run_step", json.dumps({"a": 1})),
        poison("arguments that do not fit", "args", "sagas.run_step", json.dumps([[], {"nope": 1}, {}])),
        poison("arguments of the wrong form", "form", "sagas.run_step",
               json.dumps([[], {"saga_id": "x", "step": "s", "direction": "sideways"}, {}])),
        poison("an event for a consumer that does not exist", "consumer", "sagas.consume_event",
               json.dumps([[], {"consumer": "nobody", "message": {"id": saga}}, {}])),
        poison("an unknown task", "unknown", "sagas.no_such_task", json.dumps([[], {}, {}])),
        poison("a body that is not JSON", "body", "sagas.run_step", "not json"),
        poison("a pickled body", "pickle", "sagas.run_step", "\x80\x04K\x01.", "application/x-python-serialize"),
        Poison("headers without a task id", f"{marker}-noid", {"task": "sagas.run_step", "marker": f"{marker}-noid"},
               json.dumps([[], {}, {}])),
        Poison("a time limit that is not a number", f"{marker}-limit",
               {**task_headers("sagas.run_step", f"{marker}-limit"), "timelimit": ["a", "b"]}, json.dumps([[], {}, {}])),
        poison("kwargs that are not an object", "kwargs", "sagas.run_step", json.dumps([[], "x", {}])),
        poison("links that are not signatures", "links", "sagas.run_step", json.dumps([[], {}, {"callbacks": "notalist"}])),
    ]


def send_poison(broker_url: str, queue: str, *, marker: str) -> list[str]:
    """Put garbage and misfitting task messages into `queue` on the broker at `broker_url` (Redis
    or RabbitMQ); returns the token of each message sent."""
    if broker_url.startswith(("redis://", "rediss://")):
        return _send_to_redis(broker_url, queue, marker)
    if broker_url.startswith(("amqp://", "amqps://", "pyamqp://")):
        return _send_to_rabbitmq(broker_url, queue, marker)
    raise ValueError(f"no poison for the broker {broker_url.split(':', 1)[0]}")


def redis_envelope(queue: str, headers: dict, body: str, content_type: str, *, encoding: str = "base64") -> str:
    """A message as kombu's Redis transport stores it in a queue's list."""
    encoded = base64.b64encode(body.encode("latin-1")).decode() if encoding == "base64" else body
    return json.dumps({
        "body": encoded, "content-encoding": "utf-8", "content-type": content_type, "headers": headers,
        "properties": {"correlation_id": headers.get("id", "x"), "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    })


def _send_to_redis(url: str, queue: str, marker: str) -> list[str]:
    import redis

    # Envelopes kombu's Redis transport cannot read at all, then task messages it can.
    raw = [
        (f"{marker}-notjson", f"not json {marker}-notjson"),
        (f"{marker}-list", json.dumps([1, 2, f"{marker}-list"])),
        (f"{marker}-noprops", json.dumps({"body": f"{marker}-noprops"})),
        (f"{marker}-b64", redis_envelope(queue, task_headers("sagas.run_step", f"{marker}-b64"), f"%%% {marker}-b64",
                                          "application/json", encoding="none")),
    ]
    raw += [(p.token, redis_envelope(queue, p.headers, p.body, p.content_type)) for p in task_messages(marker)]
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        for _, item in raw:
            client.lpush(queue, item)
    finally:
        client.close()
    return [token for token, _ in raw]


def _send_to_rabbitmq(url: str, queue: str, marker: str) -> list[str]:
    from kombu import Connection, Queue

    messages = [
        Poison("not json", f"{marker}-notjson", {"marker": f"{marker}-notjson"}, f"not json {marker}-notjson"),
        Poison("a list", f"{marker}-list", {"marker": f"{marker}-list"}, json.dumps([1, 2, f"{marker}-list"])),
        *task_messages(marker),
    ]
    with Connection(url, connect_timeout=5) as conn:
        producer = conn.Producer()
        for p in messages:
            producer.publish(p.body.encode("latin-1"), routing_key=queue, exchange="", headers=p.headers,
                             content_type=p.content_type, content_encoding="binary", serializer=None, declare=[Queue(queue)])
    return [p.token for p in messages]
