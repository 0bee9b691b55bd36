"""An open-loop HTTP load generator for `make bench`, run in its own process: requests go out on a
fixed schedule whether or not earlier ones have answered, and each latency is measured from the
request's scheduled time, so a slow server cannot slow the load down and hide its own queueing
(coordinated omission). Prints one JSON object."""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.loadgen")
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--skus", required=True, help="comma-separated skus to order")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds at the same rate first, not counted (workers load the app)")
    args = parser.parse_args(argv)
    url = urlsplit(args.url)
    skus = args.skus.split(",")
    rng = random.Random(11)
    warmup = int(args.rate * args.warmup)
    total = warmup + int(args.rate * args.seconds)
    latencies: list[float] = []
    sent_at: list[float] = []  # seconds into the run, per latency
    statuses: dict[str, int] = {}
    lock = threading.Lock()

    def post(scheduled: float, body: bytes, counted: bool) -> None:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        try:
            conn.request("POST", url.path, body=body, headers={
                "Authorization": f"Token {args.token}",
                "Content-Type": "application/json",
                "Idempotency-Key": str(uuid.uuid4()),
            })
            response = conn.getresponse()
            response.read()
            status = str(response.status)
        except OSError as exc:
            status = type(exc).__name__
        finally:
            conn.close()
        if not counted:
            return
        with lock:
            latencies.append(time.monotonic() - scheduled)
            sent_at.append(scheduled - start - args.warmup)
            statuses[status] = statuses.get(status, 0) + 1

    start = time.monotonic() + 0.1
    with ThreadPoolExecutor(max_workers=64) as pool:
        for n in range(total):
            items = [{"sku": sku, "quantity": rng.randint(1, 3)} for sku in rng.sample(skus, rng.randint(1, 3))]
            body = json.dumps({"items": items, "payment_method": "pm_ok"}).encode()
            scheduled = start + n / args.rate
            pause = scheduled - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            pool.submit(post, scheduled, body, n >= warmup)
    elapsed = time.monotonic() - start - args.warmup
    ok = sum(count for status, count in statuses.items() if status.startswith("2"))
    json.dump({"offered_rate": args.rate, "requests": total - warmup, "warmup_s": args.warmup, "statuses": statuses, "ok": ok,
               "throughput_per_s": round(ok / elapsed, 1), "latencies": latencies, "sent_at": sent_at}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
