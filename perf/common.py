"""What the benchmark and the chaos soak share: the machine description, percentiles, and
writing a report as markdown + JSON."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) by the nearest-rank method; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary_ms(seconds: Sequence[float]) -> dict:
    """count, p50, p95, p99 and max of durations given in seconds, in milliseconds."""
    out = {"count": len(seconds)}
    for name, p in (("p50_ms", 50), ("p95_ms", 95), ("p99_ms", 99), ("max_ms", 100)):
        value = percentile(seconds, p)
        out[name] = None if value is None else round(value * 1000, 2)
    return out


def spread(values: Sequence[float], *, digits: int = 3) -> dict:
    """median, min and max of per-round figures (None for each when there are none)."""
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits), "max": round(max(values), digits)}


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Round by round, numerator / denominator: each ratio compares two variants that ran in the
    same round, so a slow spell of the machine weighs on both sides of it."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} rounds against {len(denominators)}: ratios pair rounds one to one")
    return [n / d for n, d in zip(numerators, denominators, strict=True)]


def process_cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU time process `pid` has used, from /proc/<pid>/stat; with
    `reaped_children`, plus that of its children that exited and were waited for. 0.0 when the
    process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])  # fields 14-17 of proc(5)
    ticks = utime + stime + (cutime + cstime if reaped_children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _command(*args: str) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_description() -> dict:
    """CPU, memory, OS, Python and the versions of the services, for the report's header."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines() if line.startswith("model name")), platform.processor())
    mem_kb = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines() if line.startswith("MemTotal")), 0)
    commit = _command("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
    return {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "postgresql": _command("psql", "--version").removeprefix("psql (PostgreSQL) "),
        "redis": _command("redis-server", "--version").split(" v=")[-1].split(" ")[0],
        "commit": commit,
    }


def machine_markdown(machine: dict) -> str:
    return (
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, {machine['os']}; "
        f"Python {machine['python']}, PostgreSQL {machine['postgresql']}, Redis {machine['redis']}; "
        f"commit {machine['commit'] or 'unknown'}, {machine['when']}."
    )


def write_report(directory: Path, stem: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write `<stem>.json` and `<stem>.md` under `directory`; returns both paths."""
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{stem}.json"
    md_path = directory / f"{stem}.md"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    md_path.write_text(markdown.rstrip() + "\n")
    return json_path, md_path


def recreate_database(url: str) -> None:
    """Drop the PostgreSQL database `url` names (disconnecting its sessions) and create it empty."""
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = parts._replace(path="/postgres").geturl().replace("postgres://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
