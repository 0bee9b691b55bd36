"""The benchmark's verdicts and report (perf.bench_report) and the open-loop load generator
(perf.loadgen), without running the benchmark itself (`make bench` does that)."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from perf.bench import TARGETS
from perf.bench_report import markdown, verdicts, without_samples
from perf.common import percentile, summary_ms


def test_percentiles_are_nearest_rank():
    values = [0.001 * n for n in range(1, 101)]

    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (0.05, 0.099, 0.1)
    assert percentile([], 99) is None
    assert summary_ms([0.010, 0.020]) == {"count": 2, "p50_ms": 10.0, "p95_ms": 20.0, "p99_ms": 20.0, "max_ms": 20.0}


def test_a_missed_target_is_reported_plainly_and_an_unmeasured_one_is_left_out():
    results = {
        "mode": "quick",
        "wall_s": 1.0,
        "sagas": {"orchestrated_vs_baseline": 0.5},
        "outbox": {"kick": {"latency": {"p99_ms": 12.0}}},
        "_raw": [1, 2, 3],
    }

    results["verdicts"] = verdicts(results, TARGETS)
    sections_not_run = {k: v for k, v in results.items() if k not in ("sagas", "outbox")}
    text = markdown(sections_not_run, [], command="make bench", machine_line="a machine")

    assert results["verdicts"]["orchestrated_vs_baseline"]["met"] is False
    assert results["verdicts"]["outbox_kick_p99_ms"]["met"] is True
    assert set(results["verdicts"]) == {"orchestrated_vs_baseline", "outbox_kick_p99_ms"}
    assert "**Missed: orchestrated_vs_baseline.**" in text
    assert "_raw" not in without_samples(results)


def test_the_embedded_phase_is_judged_by_its_wall_time_ratio_and_reported_with_both_setups():
    figures = {"wall_s": 20.0, "median_s": 12.0, "p95_s": 15.0}
    results = {
        "mode": "quick",
        "wall_s": 1.0,
        "embedded": {"orders": 60, "embedded": {**figures, "wall_s": 25.0}, "services": figures, "wall_ratio": 1.25, "median_ratio": 1.0},
    }

    results["verdicts"] = verdicts(results, TARGETS)
    text = markdown(results, [], command="make bench", machine_line="a machine")

    assert results["verdicts"] == {"embedded_vs_services_wall": {"value": 1.25, "target": 2.0, "sense": "at most", "met": True}}
    assert "| embedded (SQLite + SQLAlchemy broker) | 25.0 | 12.0 | 15.0 |" in text
    assert "| PostgreSQL + Redis | 20.0 | 12.0 | 15.0 |" in text and "**1.25x** wall time" in text


class _SlowCreated(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_load_generator_sends_at_the_offered_rate_and_reports_every_request():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowCreated)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "perf.loadgen", f"--url=http://127.0.0.1:{server.server_port}/api/orders/",
             "--token=t", "--rate=40", "--seconds=1", "--warmup=0.25", "--skus=A,B,C"],
            capture_output=True, text=True, check=True, timeout=60,
        )
    finally:
        server.shutdown()
    report = json.loads(out.stdout)

    assert report["requests"] == 40
    assert report["statuses"] == {"201": 40}
    assert len(report["latencies"]) == len(report["sent_at"]) == 40
    assert 0.0 <= min(report["sent_at"]) and max(report["sent_at"]) < 1.0
