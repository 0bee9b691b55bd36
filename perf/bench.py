"""`make bench`: chainsaga against a hand-rolled Celery chain, on PostgreSQL + Redis with real
`celery worker` processes, everything in one run so the ratios mean something.

    python -m perf.bench            # about 6 minutes on 2 cores
    python -m perf.bench --quick    # about 2 minutes, smaller samples (figures are noisier)

Writes docs/benchmarks/latest.{md,json} and charts (PNG) next to them (--quick: var/benchmarks/,
not committed); --out picks another folder.
Uses its own database (dropped and created again) and its own Redis databases (flushed), named by
BENCH_DATABASE_URL, BENCH_BROKER_URL and BENCH_REDIS_URL; never the ones `make run` uses.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from perf.common import REPO, machine_description, machine_markdown, write_report

DEFAULTS = {
    "BENCH_DATABASE_URL": "postgres://postgres@127.0.0.1:5432/chainsaga_bench",
    "BENCH_BROKER_URL": "redis://127.0.0.1:6379/9",
    "BENCH_REDIS_URL": "redis://127.0.0.1:6379/8",
}
TARGETS = {
    "orchestrated_vs_baseline": 0.8,  # throughput ratio, at least
    "outbox_kick_p99_ms": 50.0,  # at most
    "relay_drain_events_per_s": 5000.0,  # at least
    "api_p99_ms": 100.0,  # at most, at perf.measure.API_RATE requests/s
    "embedded_vs_services_wall": 2.0,  # at most: place_orders embedded / on PostgreSQL + Redis (perf.embedded)
}


@dataclass(frozen=True)
class Plan:
    """How much of each measurement one run does."""

    sagas: int  # per variant
    noop_chains: int
    outbox_seconds: float
    drain_events: int
    api_seconds: float
    pg_commit_seconds: float
    embedded_orders: int  # place_orders --count on each setup (the README's 200)

    @classmethod
    def for_mode(cls, quick: bool) -> Plan:
        if quick:
            return cls(sagas=150, noop_chains=500, outbox_seconds=4, drain_events=20_000, api_seconds=6, pg_commit_seconds=1, embedded_orders=60)
        return cls(sagas=1200, noop_chains=3000, outbox_seconds=20, drain_events=100_000, api_seconds=30, pg_commit_seconds=3, embedded_orders=200)


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


def recreate_database(url: str) -> None:
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = parts._replace(path="/postgres").geturl().replace("postgres://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about two minutes, smaller samples")
    parser.add_argument("--out", type=Path, default=None, help="where the report goes (default docs/benchmarks/, with --quick var/benchmarks/)")
    parser.add_argument("--only", help="comma-separated subset of: reference,sagas,outbox,drain,api,embedded (for profiling)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = REPO / ("var" if args.quick else "docs") / "benchmarks"
    urls = configure_environment()
    recreate_database(urls["BENCH_DATABASE_URL"])

    import django

    django.setup()
    from perf import bench_report, measure

    plan = Plan.for_mode(args.quick)
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
