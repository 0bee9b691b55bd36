"""`make bench-history`: the scale benchmark of issue 15. What the engine, its periodic jobs and the
pages around it cost with an empty saga log and with a million finished sagas, side by side in one
run, judged against the issue's targets.

    python -m perf.bench_history                  # 1,000,000 sagas: about 20 minutes on 2 cores
    python -m perf.bench_history --short          # 20,000 sagas in a few minutes (figures are noisier)
    python -m perf.bench_history --history 100000

Writes docs/benchmarks/history.{md,json} (--short: var/benchmarks/history-short.*, not committed;
--out picks another folder) and exits 1 when a target is missed. Uses the benchmark's own database
and Redis databases, as `make bench` does (BENCH_DATABASE_URL, BENCH_BROKER_URL, BENCH_REDIS_URL:
see perf/bench.py), and a twin database named after it with `_empty` for the empty log's throughput
rounds; both are dropped and created again. perf/history_scale.py says what is measured, in order.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from perf.bench import AT_LEAST, AT_MOST, configure_environment
from perf.common import REPO, machine_description, machine_markdown, recreate_database, write_report

HISTORY_DEFAULT = 1_000_000
HISTORY_SHORT = 20_000

# Issue 15's targets, judged at N for each item of their kind: (sense, goal, what is judged).
TARGETS = {
    "throughput_ratio": (AT_LEAST, 0.95, "orchestrated throughput at N / at 0 (median of the alternated pairs)"),
    "periodic_job_ms": (AT_MOST, 20.0, "each periodic job, ms per run"),
    "health_ms": (AT_MOST, 10.0, "GET /api/health/, ms"),
    "admin_page_ms": (AT_MOST, 50.0, "each admin list, filter and search, ms"),
    "order_page_ms": (AT_MOST, 30.0, "GET /api/orders/, ms"),
    "order_page_extra_queries": (AT_MOST, 0, "GET /api/orders/, queries of a full page beyond a page of 1"),
    "drain_events_per_s": (AT_LEAST, 5000.0, "a backlog drained by one relay, events/s from the first to the last"),
    # FAILED sagas (0.1% of the old history) are kept for an operator, whatever their age.
    "retention_rows_ratio": (AT_MOST, 1.01, "rows of the pruned tables after pruning / before the old history was loaded"),
}
HEALTH = "GET /api/health/ (staff)"
ONE_ORDER_PAGE = "GET /api/orders/ (a customer with 1 order)"
FULL_PAGES = ("GET /api/orders/ (bench customer)", "GET /api/orders/ (a history customer)")
# The tables the retention prunes (orders and payments stay: the shop's records).
PRUNED_TABLES = ("sagas_sagainstance", "sagas_stepexecution", "sagas_outboxevent", "sagas_inboxmessage", "sagas_consumerdelivery",
                 "orders_idempotencyrecord", "inventory_reservation")


@dataclass(frozen=True)
class Plan:
    """How much of each measurement one run does."""

    history: int  # finished sagas bulk-loaded
    throughput_sagas: int  # orders per throughput round
    throughput_pairs: int  # pairs of rounds, empty log and loaded log
    warmup_sagas: int  # untimed orders before each round
    drain_events: int  # the backlog drained at 0 and at N
    drain_max_seconds: float  # the relay is stopped then, whatever is left
    key_sagas: int  # sagas per round of the keys comparison
    key_pairs: int
    retention_sagas: int  # old sagas loaded past the retention window, when there is a pruning job
    backlog_events: int = 5_000  # waiting when the relay's claim is timed
    repeat: int = 5  # runs per check (the median is reported)

    @classmethod
    def for_size(cls, history: int, *, short: bool) -> Plan:
        if short:
            return cls(history=history, throughput_sagas=40, throughput_pairs=2, warmup_sagas=10, drain_events=20_000,
                       drain_max_seconds=30, key_sagas=2_000, key_pairs=2, retention_sagas=max(1, history // 5), repeat=3)
        return cls(history=history, throughput_sagas=300, throughput_pairs=5, warmup_sagas=30, drain_events=100_000,
                   drain_max_seconds=120, key_sagas=20_000, key_pairs=3, retention_sagas=max(1, history // 5))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.bench_history", description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help=f"{HISTORY_SHORT:,} sagas and small samples, in a few minutes")
    parser.add_argument("--history", type=int, default=None, metavar="N", help=f"finished sagas to load (default {HISTORY_DEFAULT:,}, --short {HISTORY_SHORT:,})")
    parser.add_argument("--out", type=Path, default=None, help="where the report goes (default docs/benchmarks/, --short var/benchmarks/)")
    args = parser.parse_args(argv)
    history = args.history or (HISTORY_SHORT if args.short else HISTORY_DEFAULT)
    out = args.out or REPO / ("var" if args.short else "docs") / "benchmarks"
    urls = configure_environment()
    recreate_database(urls["BENCH_DATABASE_URL"])

    import django

    django.setup()
    from perf.history_scale import scale_run

    plan = Plan.for_size(history, short=args.short)
    started = time.monotonic()
    results = scale_run(plan, empty_url=twin_url(urls["BENCH_DATABASE_URL"]))
    results["machine"] = machine_description()
    results["mode"] = "short" if args.short else "full"
    results["plan"] = plan.__dict__
    results["wall_s"] = round(time.monotonic() - started, 1)
    results["verdicts"] = verdicts(results)
    stem = "history-short" if args.short else "history"
    command = "make bench-history" + (f' BENCH_HISTORY_ARGS="{" ".join(argv or sys.argv[1:])}"' if (argv or sys.argv[1:]) else "")
    text = markdown(results, command=command, machine_line=machine_markdown(results["machine"]))
    json_path, md_path = write_report(out, stem, _without_samples(results), text)
    print(text)
    print(f"\nwrote {md_path.relative_to(REPO) if md_path.is_relative_to(REPO) else md_path} and {json_path.name}")
    return 0 if all(v["met"] for v in results["verdicts"]) and not results.get("failed") else 1


def twin_url(url: str) -> str:
    """The empty log's database: the benchmark's, named with `_empty`."""
    parts = urlsplit(url)
    return parts._replace(path=parts.path + "_empty").geturl()


# --- verdicts --------------------------------------------------------------------------------------


def periodic_jobs(point: dict) -> list[str]:
    """The names of the periodic jobs' checks among a point's (perf.history_scale.scale_point)."""
    from perf.history_scale import ENGINE_JOBS

    return [name for name in point if name in ENGINE_JOBS.values() or name.startswith(("relay claim", "beat task"))]


def verdicts(results: dict) -> list[dict]:
    """Each target for each item it covers: the value at N (and at 0 when there is one), met or not."""
    at_0, at_n = results["at_0"], results["at_n"]
    out = []

    def judge(target: str, item: str, value, zero=None) -> None:
        if value is None:
            return
        sense, goal, _ = TARGETS[target]
        met = value >= goal if sense == AT_LEAST else value <= goal
        out.append({"target": target, "item": item, "at_0": zero, "value": value, "goal": goal, "sense": sense, "met": met})

    ms = lambda point, name: (point.get(name) or {}).get("ms")  # noqa: E731
    queries = lambda point, name: (point.get(name) or {}).get("queries")  # noqa: E731
    t = results.get("throughput")
    if t:
        judge("throughput_ratio", f"place_order, {t['at_0']['median']} -> {t['at_n']['median']} sagas/s", t["ratio"]["median"])
    for name in periodic_jobs(at_n):
        judge("periodic_job_ms", name, ms(at_n, name), ms(at_0, name))
    for name, job in (results.get("retention") or {}).get("jobs", {}).items():
        judge("periodic_job_ms", f"{name}, nothing to prune", job["idle"]["ms"])
    judge("health_ms", HEALTH, ms(at_n, HEALTH), ms(at_0, HEALTH))
    for name in at_n:
        if name.startswith("admin "):
            judge("admin_page_ms", name, ms(at_n, name), ms(at_0, name))
    for name in (ONE_ORDER_PAGE, *FULL_PAGES):
        judge("order_page_ms", name, ms(at_n, name), ms(at_0, name))
    for name in FULL_PAGES:
        if queries(at_n, name) is not None and queries(at_n, ONE_ORDER_PAGE) is not None:
            zero = queries(at_0, name) - queries(at_0, ONE_ORDER_PAGE) if queries(at_0, name) is not None else None
            judge("order_page_extra_queries", name, queries(at_n, name) - queries(at_n, ONE_ORDER_PAGE), zero)
    if "drain_at_n" in results:
        d0, dn = (results.get("drain_at_0") or {}).get("as_they_are") or {}, results["drain_at_n"]["as_they_are"]
        judge("drain_events_per_s", f"{dn['events']:,} events, statistics as they are", dn["per_s"], d0.get("per_s"))
    retention = results.get("retention") or {}
    if retention.get("available"):
        rows = retention["rows"]
        before, after = (sum(rows[when][t] for t in PRUNED_TABLES) for when in ("before", "after"))
        judge("retention_rows_ratio", ", ".join(PRUNED_TABLES), round(after / max(1, before), 4))
    return out


def missed_sentence(verdicts: list[dict]) -> str:
    missed = [v for v in verdicts if not v["met"]]
    if not missed:
        return f"All {len(verdicts)} targets met."
    return f"**Missed {len(missed)} of {len(verdicts)}:** " + "; ".join(f"{v['item']} {v['value']}" for v in missed) + "."


def _without_samples(data):
    """The results minus the raw plans (keys starting with '_'), for the JSON file."""
    if isinstance(data, dict):
        return {k: _without_samples(v) for k, v in data.items() if not k.startswith("_")}
    if isinstance(data, list):
        return [_without_samples(v) for v in data]
    return data


# --- the report ------------------------------------------------------------------------------------


def _n(value) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f}"


def markdown(results: dict, *, command: str, machine_line: str) -> str:
    n = results["sagas"]
    lines = [f"# The engine with a long history: 0 and {n:,} finished sagas", "", machine_line,
             f"Mode: {results['mode']}, wall time {results['wall_s']} s. Command: `{command}`.", ""]
    for part, error in (results.get("failed") or {}).items():
        lines += [f"**Incomplete: the part \"{part}\" failed, its figures are missing:** `{error.splitlines()[0]}`", ""]
    lines += _targets_markdown(results, n)
    lines += _load_markdown(results, n)
    if "throughput" in results:
        lines += _throughput_markdown(results["throughput"], n)
    lines += _checks_markdown(results, n)
    if "drain_at_0" in results and "drain_at_n" in results:
        lines += _drain_markdown(results, n)
    lines += _storage_markdown(results["storage"], n, dense=results["load"].get("indexes_set_aside", False))
    if "keys" in results:
        lines += _keys_markdown(results["keys"], n)
    if "retention" in results:
        lines += _retention_markdown(results["retention"])
    return "\n".join(lines)


def _targets_markdown(results: dict, n: int) -> list[str]:
    lines = ["## Targets (issue 15)", "", f"| target | item | at 0 | at {n:,} | goal | met |", "|---|---|---|---|---|---|"]
    for v in results["verdicts"]:
        lines.append(f"| {TARGETS[v['target']][2]} | {v['item']} | {_n(v['at_0'])} | {_n(v['value'])} | {v['sense']} {v['goal']} | {'yes' if v['met'] else '**NO**'} |")
    if not (results.get("retention") or {}).get("available"):
        lines.append(f"| {TARGETS['retention_rows_ratio'][2]} | retention: not available (no pruning task in the beat schedule) | - | - | - | - |")
    return [*lines, "", missed_sentence(results["verdicts"]), ""]


def _load_markdown(results: dict, n: int) -> list[str]:
    load = results["load"]
    return [
        "## The history",
        "",
        f"{n:,} finished `place_order` sagas ({load['orders']:,} orders with the choreographed ones, ~50 per customer) were "
        f"bulk-loaded by perf/history.py in **{load['seconds']} s**: {load['rows_seconds']} s writing the rows "
        f"(`INSERT ... SELECT generate_series`), {load['indexes_seconds']} s building the indexes set aside meanwhile, "
        f"{load['vacuum_seconds']} s `VACUUM ANALYZE`; created between {load['since'][:16]} and {load['until'][:16]}. "
        f"Wall time of each part of the run (s): {', '.join(f'{k} {v}' for k, v in results.get('part_seconds', {}).items())}. "
        f"Each check is the median of {results['repeat']} runs after an unmeasured one, in ms, at 0 and again at {n:,} on the "
        f"same URLs; \"queries\" counts the statements the last run sent; the plan column names how PostgreSQL read the "
        "history tables at N (`EXPLAIN (ANALYZE, BUFFERS)` of each statement; **bold**: a sequential scan of a history table).",
        "",
    ]


def _throughput_markdown(t: dict, n: int) -> list[str]:
    lines = [
        "## Throughput, alternated",
        "",
        f"{t['pairs']} pairs of rounds of {t['sagas']} orchestrated orders (pm_ok) at saturation, 2 worker processes: one round on a "
        f"twin database with an empty log, one on the database with {n:,} sagas, who goes first rotating; each round in a process "
        f"and with a worker of its own, after {t['warmup']} untimed orders (as `make bench`'s rounds: placed while the worker does "
        "not consume, timed from its first message to the last order settled and its events published).",
        "",
        f"| pair | sagas/s at 0 | sagas/s at {n:,} | ratio | worker CPU ms/order at 0 | at {n:,} |",
        "|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(t["rounds"]):
        lines.append(f"| {k + 1} | {r['at_0']['per_s']} | {r['at_n']['per_s']} | {t['ratio']['rounds'][k]} | {r['at_0']['cpu_ms_per_order']} | {r['at_n']['cpu_ms_per_order']} |")
    lines += ["", f"Ratio at {n:,} / at 0: **{t['ratio']['median']}** (median; {t['ratio']['min']}-{t['ratio']['max']}); "
              f"worker CPU per order, same ratio: {t['cpu_ratio']['median']} ({t['cpu_ratio']['min']}-{t['cpu_ratio']['max']}).", ""]
    return lines


def _checks_markdown(results: dict, n: int) -> list[str]:
    at_0, at_n = results["at_0"], results["at_n"]
    deadline_ms = results.get("web_deadline_s", 4.0) * 1000
    groups = {
        "Periodic jobs": periodic_jobs(at_n),
        "Health and the order API": [name for name in at_n if name.startswith("GET")],
        "Admin lists, filters and searches": [name for name in at_n if name.startswith("admin ")],
    }
    groups["The engine's other paths, place_orders' checks"] = [name for name in at_n if not any(name in g for g in groups.values())]
    lines = []
    for title, names in groups.items():
        lines += [f"## {title}", "", f"| check | ms at 0 | ms at {n:,} | queries at 0 | at {n:,} | plan at {n:,} |", "|---|---|---|---|---|---|"]
        for name in names:
            zero, full = at_0.get(name), at_n.get(name)
            if full is None:
                lines.append(f"| {name} | {_n((zero or {}).get('ms'))} | - | - | - | not measured: nothing to look for |")
                continue
            late = " (past the request deadline: a 503 in production)" if name.startswith(("GET", "admin")) and full["ms"] > deadline_ms else ""
            lines.append(f"| {name} | {_n((zero or {}).get('ms'))} | {full['ms']}{late} | {_n((zero or {}).get('queries'))} | {_n(full.get('queries'))} | {full.get('plan', '-')} |")
        lines.append("")
    urls = {name: path for name, path in (results.get("admin_urls") or {}).items()}
    if urls:
        lines += ["The admin pages' URLs:", ""] + [f"- {name}: `{path}`" for name, path in urls.items()] + [""]
    return lines


def _drain_markdown(results: dict, n: int) -> list[str]:
    def how(d: dict) -> str:
        if d.get("stopped"):
            return f"{d['per_s']:,} events/s, stopped after {d['wall_s']} s with {d['published']:,} of {d['events']:,} published"
        return f"{d['per_s']:,} events/s, {d['published']:,} in {d['wall_s']} s"

    d0, dn = results["drain_at_0"], results["drain_at_n"]
    return [
        "## Relay drain",
        "",
        f"A backlog of {dn['as_they_are']['events']:,} events (5 per aggregate) inserted at once, then drained by one relay "
        f"publishing to Redis Streams, batch {dn['as_they_are']['batch_size']}, timed from the first event published to the last. "
        "First with the planner's statistics as they were, as a live system has them (autovacuum analyses a table once 10% of "
        "its rows changed: on a table of millions, never for a backlog of thousands; the target is judged on this one), then "
        "again with the table analysed first, as `make bench`'s drain does.",
        "",
        f"| statistics | at 0 | at {n:,} |",
        "|---|---|---|",
        f"| as they are | {how(d0['as_they_are'])} | **{how(dn['as_they_are'])}** |",
        f"| analysed | {how(d0['analysed'])} | {how(dn['analysed'])} |",
        "",
    ]


def _storage_markdown(storage: dict, n: int, *, dense: bool) -> list[str]:
    lines = [
        "## Storage",
        "",
        f"What the history added, per table, scaled to a million sagas (from {n:,}; rows as ANALYZE counted them)."
        + (" The indexes were built in one sort after the load, so they are denser than indexes grown insert by insert (about 90% "
           "full against ~70% after random inserts): a live system's are larger." if dense else ""),
        "",
        "| table | rows per million | table MiB per million | index MiB per million | total MiB per million |",
        "|---|---|---|---|---|",
    ]
    totals = [0, 0.0, 0.0]
    for table, s in sorted(storage["per_million"].items()):
        lines.append(f"| {table} | {s['rows']:,} | {s['table_mib']:,} | {s['index_mib']:,} | {s['table_mib'] + s['index_mib']:,.1f} |")
        totals = [totals[0] + s["rows"], totals[1] + s["table_mib"], totals[2] + s["index_mib"]]
    lines += [f"| **total** | {totals[0]:,} | {totals[1]:,.1f} | {totals[2]:,.1f} | **{totals[1] + totals[2]:,.1f}** |", ""]
    at_n = storage["at_n"]
    total_n = sum(s["table_bytes"] + s["index_bytes"] for s in at_n.values())
    lines += [f"On disk at {n:,}: {_mib(total_n)} MiB in the history tables with their indexes.", ""]
    return lines


def _keys_markdown(keys: dict, n: int) -> list[str]:
    return [
        "## Keys: random against time-ordered",
        "",
        f"{keys['sagas']:,} finished sagas with their four steps inserted at {n:,}, {keys['batch']} sagas per transaction, "
        "through the real tables' indexes and foreign keys, with random keys (`gen_random_uuid()`, version 4) and with "
        "time-ordered ones (RFC 9562 version 7 layout made in SQL: 48 bits of Unix milliseconds, then random bits), in "
        f"{keys['pairs']} alternated pairs of rounds. The models' keys are unchanged (uuid4).",
        "",
        "| keys | sagas/s (median) | ms of database time per saga with its steps | per round (sagas/s) |",
        "|---|---|---|---|",
        *(f"| {label} | {keys[kind]['median']} | {1000 / keys[kind]['median']:.3f} | {' / '.join(str(x) for x in keys[kind]['rounds'])} |"
          for kind, label in (("uuid4", "random (uuid4)"), ("uuid7", "time-ordered (uuid7)"))),
        "",
        f"Time-ordered / random, pair by pair: **{keys['ratio']['median']}x** the inserts per second "
        f"({keys['ratio']['min']}-{keys['ratio']['max']}). Only the database's share of a saga is timed here: inserting its rows "
        "through their indexes, in SQL. A saga through the worker costs tens of ms of CPU besides (see the throughput table), so "
        "the difference per saga is the one in the middle column.",
        "",
    ]


def _retention_markdown(retention: dict) -> list[str]:
    if not retention.get("available"):
        return ["## Retention", "", "retention: not available (no pruning task in the beat schedule; perf.history_scale.retention_measure "
                "runs the beat's tasks whose names say prune, retention or purge).", ""]
    rows = retention["rows"]
    lines = [
        "## Retention",
        "",
        f"{retention['old_sagas']:,} more finished sagas loaded, ending {retention['old_until'][:10]} (past any retention window up to a "
        "year), then each pruning job run as beat runs it until it had nothing left to do:",
        "",
        "| job | runs | ms per run (median) | slowest run | seconds in all | ms with nothing to prune |",
        "|---|---|---|---|---|---|",
    ]
    for name, job in retention["jobs"].items():
        lines.append(f"| {name} | {job['runs']} | {job['ms_median']} | {job['ms_max']} | {job['seconds']} | {job['idle']['ms']} |")
    lines += ["", "| table | rows before | with the old history | after pruning | MiB with the old history | MiB after (VACUUM, not FULL) |", "|---|---|---|---|---|---|"]
    with_old, after = retention["storage"]["with_old"], retention["storage"]["after"]
    for table in sorted(rows["before"]):
        size = lambda s: _mib(s[table]["table_bytes"] + s[table]["index_bytes"]) if table in s else "-"  # noqa: E731
        lines.append(f"| {table} | {rows['before'][table]:,} | {rows['with_old'][table]:,} | {rows['after'][table]:,} | {size(with_old)} | {size(after)} |")
    lines += ["", "Pruned space is reused by new rows (plain VACUUM); the files keep their high-water mark until a VACUUM FULL.", ""]
    return lines


if __name__ == "__main__":
    sys.exit(main())
