"""`make bench`: chainsaga against hand-rolled Celery chains, on PostgreSQL + Redis with real
`celery worker` processes, everything in one run so the ratios mean something.

    python -m perf.bench            # about 12 minutes on 2 cores
    python -m perf.bench --quick    # about 2 minutes, smaller samples (figures are noisier)
    python -m perf.bench --history 1000000  # the history phase with a million sagas (a few minutes more)

Writes docs/benchmarks/latest.{md,json} and charts (PNG) next to them (--quick: var/benchmarks/,
not committed); --out picks another folder.
Uses its own database (dropped and created again) and its own Redis databases (flushed), named by
BENCH_DATABASE_URL, BENCH_BROKER_URL and BENCH_REDIS_URL; never the ones `make run` uses.

The sagas phase compares five variants of the order process (perf/baseline.py describes the three
references): the orchestrated saga, the choreographed one, the fair baseline (a careful chain with
the same placement, writes, outbox events and a queued compensation), the naive chain of before,
and a chain of four no-op tasks. Each round runs every variant in turn (who goes first rotates)
after an untimed warm-up round; the report gives the median and min-max over rounds of each
variant's throughput and of each ratio, the ratio taken round by round. Placement is out of the
timed window and done the same way for every variant: the worker is told to stop consuming its
queue (Celery's remote control, cancel_consumer), the round's orders are placed through the
placement path (order_place for the sagas and the fair baseline; the naive chain keeps its own),
their on-commit messages wait in the broker, and the worker is told to consume again
(add_consumer). The clock starts when the worker takes the first message, a marker task queued
ahead of the orders, and stops when the last order settled and the last of the round's outbox
events was published, read from the rows' own timestamps. The on-commit kick of the
outbox relay is held back while placing (it would expire in the queue) and sent once at the
release, for every variant. The rounds run once per worker concurrency of the sweep (2, 4, 8
processes); the targets are judged at 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from perf.common import REPO, machine_description, machine_markdown, recreate_database, write_report

DEFAULTS = {
    "BENCH_DATABASE_URL": "postgres://postgres@127.0.0.1:5432/chainsaga_bench",
    "BENCH_BROKER_URL": "redis://127.0.0.1:6379/9",
    "BENCH_REDIS_URL": "redis://127.0.0.1:6379/8",
}
AT_LEAST, AT_MOST = "at least", "at most"
TARGETS = {  # name: (sense, goal); the ratios are medians over rounds at the headline concurrency
    "orchestrated_vs_baseline": (AT_LEAST, 0.9),  # throughput, x the fair baseline
    "choreographed_vs_baseline": (AT_LEAST, 0.9),
    "orchestrated_step_overhead_ms": (AT_MOST, 2.0),  # worker time the engine adds per step
    "outbox_kick_p99_ms": (AT_MOST, 50.0),
    "relay_drain_events_per_s": (AT_LEAST, 5000.0),
    "api_p99_ms": (AT_MOST, 100.0),  # at perf.measure.API_RATE requests/s
    "embedded_vs_services_wall": (AT_MOST, 2.0),  # place_orders embedded / on PostgreSQL + Redis (perf.embedded)
}

# The history phase's size: `make bench` loads this many finished sagas (about a minute more);
# `--history 1000000` shows the million (a few minutes more).
HISTORY_DEFAULT = 100_000
HISTORY_QUICK = 10_000


@dataclass(frozen=True)
class Plan:
    """How much of each measurement one run does."""

    sagas: int  # per variant and round
    rounds: int  # timed rounds, after one untimed warm-up round
    warmup_sagas: int  # per variant, in the warm-up round
    concurrencies: tuple[int, ...]  # worker processes: the sagas rounds run once for each
    outbox_seconds: float
    drain_events: int
    api_seconds: float
    pg_commit_seconds: float
    embedded_orders: int = 200  # place_orders --count on each setup (the README's 200)
    history: int = 0  # finished sagas bulk-loaded by the history phase (perf.history_bench); 0: skipped

    @classmethod
    def for_mode(cls, quick: bool) -> Plan:
        if quick:  # 3 rounds only, to stay near two minutes: the spreads are wide
            return cls(sagas=30, rounds=3, warmup_sagas=10, concurrencies=(2, 4, 8), outbox_seconds=4, drain_events=20_000,
                       api_seconds=6, pg_commit_seconds=1, embedded_orders=60)
        return cls(sagas=200, rounds=5, warmup_sagas=40, concurrencies=(2, 4, 8), outbox_seconds=20, drain_events=100_000,
                   api_seconds=30, pg_commit_seconds=3)


def configure_environment() -> dict[str, str]:
    """Point this process (and the workers it starts) at the benchmark's own database and Redis
    databases, with production settings. Must run before Django is set up."""
    urls = {name: os.environ.get(name, default) for name, default in DEFAULTS.items()}
    var_dir = Path(tempfile.mkdtemp(prefix="chainsaga-bench-"))
    os.environ.update(
        DJANGO_SETTINGS_MODULE="config.settings.production",
        SECRET_KEY="bench-only-secret-key-not-for-production-use-0123456789abcdef",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        SECURE_SSL_REDIRECT="false",
        DATABASE_URL=urls["BENCH_DATABASE_URL"],
        CELERY_BROKER_URL=urls["BENCH_BROKER_URL"],
        REDIS_URL=urls["BENCH_REDIS_URL"],
        CELERY_TASK_DEFAULT_QUEUE="bench",
        CHAINSAGA_VAR_DIR=str(var_dir),
        OUTBOX_PUBLISHER="redis,consumers",
        API_THROTTLE_USER="1000000/min",
        # The API phase offers orders with the workers stopped: they stay pending by design, and the
        # per-customer cap of pending orders (a guard against hoarding) would answer 429 instead.
        ORDER_MAX_PENDING_PER_CUSTOMER="1000000",
        LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    return urls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about two minutes, smaller samples")
    parser.add_argument("--out", type=Path, default=None, help="where the report goes (default docs/benchmarks/, with --quick var/benchmarks/)")
    parser.add_argument("--only", help="comma-separated subset of: reference,sagas,outbox,drain,history,api,embedded (for profiling)")
    parser.add_argument("--history", type=int, default=None, metavar="N",
                        help=f"bulk-load N finished sagas and measure the hot paths at 0 and at N (default {HISTORY_DEFAULT:,}, "
                             f"with --quick {HISTORY_QUICK:,}; 0 skips it)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = REPO / ("var" if args.quick else "docs") / "benchmarks"
    urls = configure_environment()
    recreate_database(urls["BENCH_DATABASE_URL"])

    import django

    django.setup()
    from perf import bench_report, measure

    plan = Plan.for_mode(args.quick)
    plan = replace(plan, history=args.history if args.history is not None else (HISTORY_QUICK if args.quick else HISTORY_DEFAULT))
    only = set(args.only.split(",")) if args.only else None
    started = time.monotonic()
    results = measure.run_all(plan, only=only)
    results["machine"] = machine_description()
    results["mode"] = "quick" if args.quick else "full"
    results["plan"] = plan.__dict__
    results["wall_s"] = round(time.monotonic() - started, 1)
    results["verdicts"] = bench_report.verdicts(results, TARGETS)
    stem = "quick" if args.quick else "latest"
    charts = bench_report.charts(results, args.out, stem)
    command = "make bench-quick" if args.quick else "make bench"
    markdown = bench_report.markdown(results, charts, command=command, machine_line=machine_markdown(results["machine"]))
    json_path, md_path = write_report(args.out, stem, bench_report.without_samples(results), markdown)
    print(markdown)
    print(f"\nwrote {md_path.relative_to(REPO) if md_path.is_relative_to(REPO) else md_path} and {json_path.name}")
    return 0 if all(v["met"] for v in results["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
