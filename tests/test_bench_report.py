"""The benchmark's verdicts and report (perf.bench_report), the round statistics and CPU reading
(perf.common) and the open-loop load generator (perf.loadgen), without running the benchmark
itself (`make bench` does that)."""

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from perf.bench import TARGETS
from perf.bench_report import markdown, missed_sentence, verdicts, without_samples
from perf.common import paired_ratios, percentile, process_cpu_seconds, spread, summary_ms


def test_percentiles_are_nearest_rank():
    values = [0.001 * n for n in range(1, 101)]

    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (0.05, 0.099, 0.1)
    assert percentile([], 99) is None
    assert summary_ms([0.010, 0.020]) == {"count": 2, "p50_ms": 10.0, "p95_ms": 20.0, "p99_ms": 20.0, "max_ms": 20.0}


def _sagas(orchestrated_vs_baseline: float, overhead_ms: float) -> dict:
    """The sagas section of the results, at the headline concurrency only, as far as verdicts read it."""
    run = {
        "ratios": {"orchestrated_vs_baseline": {"median": orchestrated_vs_baseline, "min": 0.1, "max": 1.2}},
        "orchestrated_step_overhead_ms": {"median": overhead_ms, "min": 0.5, "max": 9.0},
    }
    return {"headline_concurrency": 2, "by_concurrency": {"2": run, "4": {"ratios": {"orchestrated_vs_baseline": {"median": 5.0}}}}}


def test_a_missed_target_is_reported_plainly_and_an_unmeasured_one_is_left_out():
    results = {
        "mode": "quick",
        "wall_s": 1.0,
        "sagas": _sagas(orchestrated_vs_baseline=0.5, overhead_ms=1.5),
        "outbox": {"kick": {"latency": {"p99_ms": 12.0}}},
        "_raw": [1, 2, 3],
    }

    results["verdicts"] = verdicts(results, TARGETS)
    sections_not_run = {k: v for k, v in results.items() if k not in ("sagas", "outbox")}
    text = markdown(sections_not_run, [], command="make bench", machine_line="a machine")

    assert results["verdicts"]["orchestrated_vs_baseline"] == {
        "value": 0.5, "target": 0.9, "sense": "at least", "met": False, "rounds_min_max": [0.1, 1.2]
    }
    assert results["verdicts"]["orchestrated_step_overhead_ms"]["met"] is True
    assert results["verdicts"]["outbox_kick_p99_ms"]["met"] is True
    assert set(results["verdicts"]) == {"orchestrated_vs_baseline", "orchestrated_step_overhead_ms", "outbox_kick_p99_ms"}
    assert "| orchestrated_vs_baseline | 0.5 (rounds 0.1-1.2) | at least 0.9 | **NO** |" in text
    assert "**Missed 1 of 3 targets: orchestrated_vs_baseline is 0.5, the target is at least 0.9.**" in text
    assert "_raw" not in without_samples(results)


def test_an_at_most_target_is_missed_above_its_goal_and_met_at_it():
    above = verdicts({"sagas": _sagas(orchestrated_vs_baseline=0.95, overhead_ms=2.01)}, TARGETS)
    at = verdicts({"sagas": _sagas(orchestrated_vs_baseline=0.9, overhead_ms=2.0)}, TARGETS)

    assert above["orchestrated_step_overhead_ms"] == {
        "value": 2.01, "target": 2.0, "sense": "at most", "met": False, "rounds_min_max": [0.5, 9.0]
    }
    assert missed_sentence(above) == "**Missed 1 of 2 targets: orchestrated_step_overhead_ms is 2.01, the target is at most 2.0.**"
    assert all(v["met"] for v in at.values()) and missed_sentence(at) == "All targets met."


def test_ratios_pair_the_rounds_and_the_spread_is_median_min_and_max():
    orchestrated, baseline = [30.0, 20.0, 33.0, 27.0, 36.0], [40.0, 25.0, 30.0, 30.0, 40.0]

    ratios = paired_ratios(orchestrated, baseline)

    assert ratios == [0.75, 0.8, 1.1, 0.9, 0.9]
    assert spread(ratios) == {"median": 0.9, "min": 0.75, "max": 1.1}
    assert spread([1.0, 2.0, 4.0, 10.0]) == {"median": 3.0, "min": 1.0, "max": 10.0}
    assert spread([]) == {"median": None, "min": None, "max": None}
    with pytest.raises(ValueError, match="pair rounds"):
        paired_ratios([1.0, 2.0], [1.0])


def test_cpu_time_is_read_from_proc_and_a_gone_process_has_none():
    busy_until = time.process_time() + 0.05
    while time.process_time() < busy_until:
        pass

    own = process_cpu_seconds(os.getpid())

    assert own >= 0.05
    assert process_cpu_seconds(os.getpid(), reaped_children=True) >= own
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert process_cpu_seconds(gone.pid) == 0.0


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
