"""Turning `make bench` results into verdicts against the targets, PNG charts and markdown."""

from __future__ import annotations

from pathlib import Path

from perf import embedded

VARIANTS = ("baseline", "orchestrated", "choreographed")


def verdicts(results: dict, targets: dict) -> dict:
    """Each target with the measured value and whether it was met; a target whose measurement
    was not run (--only) is left out."""
    measured = {
        "orchestrated_vs_baseline": (results.get("sagas", {}).get("orchestrated_vs_baseline"), "at least"),
        "outbox_kick_p99_ms": (results.get("outbox", {}).get("kick", {}).get("latency", {}).get("p99_ms"), "at most"),
        "relay_drain_events_per_s": (results.get("drain", {}).get("per_s"), "at least"),
        "api_p99_ms": (results.get("api", {}).get("latency", {}).get("p99_ms"), "at most"),
        "embedded_vs_services_wall": (results.get("embedded", {}).get("wall_ratio"), "at most"),
    }
    out = {}
    for name, (value, sense) in measured.items():
        if value is None:
            continue
        target = targets[name]
        met = value >= target if sense == "at least" else value <= target
        out[name] = {"value": value, "target": target, "sense": sense, "met": met}
    return out


def without_samples(data):
    """The results minus the raw samples (keys starting with '_'), for the JSON file."""
    if isinstance(data, dict):
        return {k: without_samples(v) for k, v in data.items() if not k.startswith("_")}
    return data


def charts(results: dict, directory: Path, stem: str) -> list[Path]:
    """Latency distributions (CDF) per saga variant and per outbox mode, and throughput bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    sagas = results.get("sagas")
    if sagas:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for variant in VARIANTS:
            _cdf(left, sagas[variant]["_latencies"], f"{variant} (p99 {sagas[variant]['latency']['p99_ms']:.0f} ms)")
        left.set(title="Saga end-to-end latency at saturation", xlabel="seconds, placed -> settled", ylabel="fraction of sagas")
        left.legend(loc="lower right")
        names = ["no-op chain"] if "reference" in results else []
        values = [results["reference"]["noop_chain"]["per_s"]] if names else []
        names += list(VARIANTS)
        values += [sagas[v]["per_s"] for v in VARIANTS]
        bars = right.bar(names, values, color=["#999999"] * (len(names) - 3) + ["#4c72b0", "#dd8452", "#55a868"])
        right.bar_label(bars, fmt="%.0f")
        right.set(title="Throughput at saturation", ylabel="chains or sagas per second")
        fig.tight_layout()
        paths.append(_save(fig, directory / f"{stem}-sagas.png"))
        plt.close(fig)
    outbox = results.get("outbox")
    api = results.get("api")
    if outbox or api:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        if outbox:
            for mode in ("beat_only", "kick"):
                _cdf(axes[0], outbox[mode]["_latencies"], f"{mode.replace('_', ' ')} (p99 {outbox[mode]['latency']['p99_ms']:.0f} ms)", scale=1000)
            axes[0].set(title=f"Outbox commit -> publish at {outbox['rate_per_s']:.0f} events/s", xlabel="milliseconds", ylabel="fraction of events")
            axes[0].set_xscale("log")
            axes[0].legend(loc="lower right")
        if api:
            _cdf(axes[1], api["_latencies"], f"POST /api/orders/ (p99 {api['latency']['p99_ms']:.0f} ms)", scale=1000)
            axes[1].set(title=f"API latency at {api['offered_rate']:.0f} requests/s (open loop)", xlabel="milliseconds", ylabel="fraction of requests")
            axes[1].legend(loc="lower right")
        fig.tight_layout()
        paths.append(_save(fig, directory / f"{stem}-outbox-api.png"))
        plt.close(fig)
    return paths


def _cdf(ax, values, label: str, *, scale: float = 1.0) -> None:
    ordered = sorted(v * scale for v in values)
    if ordered:
        ax.plot(ordered, [(n + 1) / len(ordered) for n in range(len(ordered))], label=label)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def markdown(results: dict, charts: list[Path], *, command: str, machine_line: str) -> str:
    lines = [f"# Benchmark: `{command}`", "", machine_line, f"Mode: {results['mode']}, wall time {results['wall_s']} s.", ""]
    missed = [name for name, v in results["verdicts"].items() if not v["met"]]
    lines.append("## Targets")
    lines.append("")
    lines.append("| target | measured | goal | met |")
    lines.append("|---|---|---|---|")
    for name, v in results["verdicts"].items():
        lines.append(f"| {name} | {v['value']} | {v['sense']} {v['target']} | {'yes' if v['met'] else '**NO**'} |")
    lines.append("")
    lines.append(f"**Missed: {', '.join(missed)}.**" if missed else "All targets met.")
    lines.append("")
    if "reference" in results:
        ref = results["reference"]
        lines += [
            "## Physical reference",
            "",
            f"- PostgreSQL, one client, one-row INSERT per commit: {ref['pg_commits_per_s']:.0f} commits/s",
            f"- Celery chain of four no-op tasks ({ref['noop_chain']['chains']} chains): {ref['noop_chain']['per_s']} chains/s, "
            f"latency p50 {ref['noop_chain']['latency']['p50_ms']} ms, p99 {ref['noop_chain']['latency']['p99_ms']} ms",
            "",
        ]
    if "sagas" in results:
        sagas = results["sagas"]
        lines += [
            "## Sagas at saturation (pm_ok, 1-3 lines per order, 2 worker processes)",
            "",
            "Each variant places its orders as fast as it can and is timed until the last one settled; two rounds, the variants taking turns. "
            "The baseline is a plain Celery chain of the same four steps calling the same services, without saga log or outbox (perf/baseline.py). "
            "Latency is placed -> settled, so at saturation it is mostly time spent queued.",
            "",
            "| variant | sagas | sagas/s | per round | x baseline | p50 ms | p95 ms | p99 ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for variant in VARIANTS:
            r = sagas[variant]
            ratio = r["per_s"] / sagas["baseline"]["per_s"]
            lines.append(
                f"| {variant} | {r['sagas']} | {r['per_s']} | {' / '.join(str(x) for x in r['rounds_per_s'])} | {ratio:.2f} | {r['latency']['p50_ms']} | {r['latency']['p95_ms']} | {r['latency']['p99_ms']} |"
            )
        lines += ["", f"Engine overhead per step (worker time): {sagas['orchestrated_step_overhead_ms']} ms.", ""]
    if "outbox" in results:
        outbox = results["outbox"]
        lines += [
            f"## Outbox commit -> publish ({outbox['rate_per_s']:.0f} events/s offered, beat every {outbox['relay_interval_s']} s)",
            "",
            "| relay | events | received | p50 ms | p99 ms | max ms |",
            "|---|---|---|---|---|---|",
        ]
        for mode in ("beat_only", "kick"):
            r = outbox[mode]
            lines.append(f"| {mode.replace('_', ' ')} | {r['events']} | {r['received']} | {r['latency']['p50_ms']} | {r['latency']['p99_ms']} | {r['latency']['max_ms']} |")
        lines.append("")
    if "drain" in results:
        d = results["drain"]
        lines += ["## Relay drain", "", f"{d['published']} of {d['events']} backlogged events published by one relay in {d['wall_s']} s: **{d['per_s']} events/s** (batch {d['batch_size']}).", ""]
    if "api" in results:
        a = results["api"]
        lines += [
            "## API",
            "",
            f"`POST /api/orders/` on gunicorn ({a['gunicorn_workers']} sync workers), open loop at {a['offered_rate']:.0f} requests/s for {a['requests']} requests after {a['warmup_s']:g} s of warm-up, with the worker stopped (the web tier alone, as on its own machine): "
            f"{a['throughput_per_s']} ok/s, statuses {a['statuses']}, p50 {a['latency']['p50_ms']} ms, p99 {a['latency']['p99_ms']} ms.",
            "",
        ]
    if "embedded" in results:
        lines += embedded.markdown(results["embedded"])
    if "worker_rss_start_mib" in results:
        s, e = results["worker_rss_start_mib"], results["worker_rss_end_mib"]
        lines += ["## Worker memory (RSS)", "", f"- main process: {s['main']} MiB at start, {e['main']} MiB after the run",
                  f"- largest pool child: {s['largest_child']} MiB at start, {e['largest_child']} MiB after the run", ""]
    for chart in charts:
        lines.append(f"![{chart.stem}]({chart.name})")
    return "\n".join(lines)
