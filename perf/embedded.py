"""Embedded mode against PostgreSQL + Redis (issue 11): the README's `place_orders` command, timed
on each setup the way a user runs it, with the processes of `make run`'s Procfile (a worker with
two pool processes, the control worker, beat) under the local settings.

    python -m perf.embedded                # 200 orders on each setup, about a minute
    python -m perf.embedded --count 60

`make bench` runs it as its "embedded" phase (perf.measure) and checks the wall-time ratio against
perf.bench.TARGETS["embedded_vs_services_wall"]. The embedded setup lives in a temporary folder
(CHAINSAGA_VAR_DIR); the PostgreSQL + Redis one uses a database of its own, created afresh, and
queues of its own on the given Redis databases.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from perf.common import REPO, recreate_database

MIX = "ok=70,declined=10,insufficient_funds=5,flaky=10,timeout=5"  # the README's
SEED = 1  # the same orders on both setups
# What the child processes inherit from this one; everything else comes from the setup, so the
# benchmark's own environment (production settings, its database) cannot leak into them.
INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
SERVICES_DEFAULTS = {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/chainsaga_bench_orders",
    "CELERY_BROKER_URL": "redis://127.0.0.1:6379/9",
    "REDIS_URL": "redis://127.0.0.1:6379/8",
}
SETTLED = re.compile(r"placed -> settled: median ([0-9.]+)s, p95 ([0-9.]+)s")


def compare(count: int, *, services: dict[str, str] | None = None, queue: str = "bench-orders") -> dict:
    """place_orders --count `count` in embedded mode, then on PostgreSQL + Redis (`services`:
    DATABASE_URL, CELERY_BROKER_URL, REDIS_URL; default: the benchmark's database with the suffix
    _orders and its Redis databases). Wall times, placed-to-settled median and p95, and the ratio."""
    services = services or _services_of_this_benchmark()
    with tempfile.TemporaryDirectory(prefix="chainsaga-embedded-") as var_dir:
        embedded = run_setup(count, _environment(var_dir=Path(var_dir) / "embedded", queue=queue))
    recreate_database(services["DATABASE_URL"])
    with tempfile.TemporaryDirectory(prefix="chainsaga-services-") as var_dir:
        on_services = run_setup(count, _environment(var_dir=Path(var_dir) / "services", queue=queue, **services))
    return {
        "orders": count,
        "mix": MIX,
        "embedded": embedded,
        "services": on_services,
        "wall_ratio": round(embedded["wall_s"] / on_services["wall_s"], 2),
        "median_ratio": round(embedded["median_s"] / on_services["median_s"], 2),
    }


def run_setup(count: int, env: dict[str, str]) -> dict:
    """Migrate, seed, start the Procfile's worker, control worker and beat, and time place_orders."""
    from sagas.testing import CeleryBeat, CeleryWorker

    _manage(env, "migrate", "--noinput", "-v0")
    _manage(env, "seed_demo")
    control_queue = f"{env['CELERY_TASK_DEFAULT_QUEUE']}-control"
    processes = [
        CeleryWorker(queues=[env["CELERY_TASK_DEFAULT_QUEUE"]], concurrency=2, env=env),
        CeleryWorker(queues=[control_queue], concurrency=1, env=env),
        CeleryBeat(env=env),
    ]
    try:
        for process in processes:
            process.start()
        started = time.monotonic()
        out = _manage(env, "place_orders", f"--count={count}", f"--mix={MIX}", f"--seed={SEED}", timeout=900)
        wall = time.monotonic() - started
    finally:
        for process in processes:
            process.stop()
    settled = SETTLED.search(out)
    if settled is None:
        raise RuntimeError(f"place_orders printed no placed -> settled figures:\n{out[-3000:]}")
    return {"wall_s": round(wall, 2), "median_s": float(settled[1]), "p95_s": float(settled[2])}


def markdown(result: dict) -> list[str]:
    """The report's section (perf.bench_report)."""
    rows = [("embedded (SQLite + SQLAlchemy broker)", result["embedded"]), ("PostgreSQL + Redis", result["services"])]
    return [
        f"## Embedded mode: `place_orders --count {result['orders']}` (README mix)",
        "",
        "The README's command on each setup with the processes of `make run` (worker with 2 pool processes, control worker, beat), "
        "local settings; wall time of the command, from start to every order settled.",
        "",
        "| setup | wall s | placed -> settled median s | p95 s |",
        "|---|---|---|---|",
        *[f"| {name} | {r['wall_s']} | {r['median_s']} | {r['p95_s']} |" for name, r in rows],
        "",
        f"Embedded / PostgreSQL + Redis: **{result['wall_ratio']}x** wall time, {result['median_ratio']}x median.",
        "",
    ]


def _environment(*, var_dir: Path, queue: str, **urls: str) -> dict[str, str]:
    """`make run`'s environment: local settings, everything under `var_dir`; embedded unless `urls`."""
    var_dir.mkdir(parents=True)
    env = {name: os.environ[name] for name in INHERITED if name in os.environ}
    env.update(
        DJANGO_SETTINGS_MODULE="config.settings.local",
        CHAINSAGA_VAR_DIR=str(var_dir),
        CELERY_TASK_DEFAULT_QUEUE=queue,
        PYTHONUNBUFFERED="1",
        **urls,
    )
    return env


def _manage(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} exited with {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def _services_of_this_benchmark() -> dict[str, str]:
    """Next to the benchmark's own (perf.bench.configure_environment): its database's name with
    the suffix _orders, its Redis databases."""
    from django.conf import settings

    return {
        "DATABASE_URL": f"{os.environ['DATABASE_URL']}_orders",
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "REDIS_URL": settings.REDIS_URL,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.embedded", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200)
    for name, default in SERVICES_DEFAULTS.items():
        parser.add_argument(f"--{name.lower().replace('_', '-')}", default=default, help=f"{name} of the PostgreSQL + Redis setup")
    parser.add_argument("--queue", default="bench-orders", help="the Celery queue of both setups (and QUEUE-control)")
    args = parser.parse_args(argv)
    # This process only starts the others; its own Django (for sagas.testing) touches no database.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")
    os.environ["CHAINSAGA_VAR_DIR"] = tempfile.mkdtemp(prefix="chainsaga-embedded-driver-")
    import django

    django.setup()
    services = {"DATABASE_URL": args.database_url, "CELERY_BROKER_URL": args.celery_broker_url, "REDIS_URL": args.redis_url}
    result = compare(args.count, services=services, queue=args.queue)
    print("\n".join(markdown(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
