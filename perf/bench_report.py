"""Turning `make bench` results into verdicts against the targets, PNG charts and markdown."""

from __future__ import annotations

from pathlib import Path

from perf import embedded

# In the order of the report's tables; labels for the charts.
VARIANTS = {
    "orchestrated": "orchestrated",
    "choreographed": "choreographed",
    "baseline": "fair baseline",
    "naive_chain": "naive chain",
    "noop_chain": "no-op chain",
}
COLOURS = {"orchestrated": "#dd8452", "choreographed": "#55a868", "baseline": "#4c72b0", "naive_chain": "#8172b3", "noop_chain": "#999999"}


def headline(results: dict) -> dict | None:
    """The sagas rounds at the concurrency the targets are judged at (None when not run)."""
    sagas = results.get("sagas")
    if not sagas:
        return None
    return sagas["by_concurrency"].get(str(sagas["headline_concurrency"]))


def verdicts(results: dict, targets: dict) -> dict:
    """Each target with the measured value and whether it was met; a target whose measurement
    was not run (--only) is left out. `targets`: name -> ("at least" or "at most", goal)."""
    runs = headline(results) or {}
    ratios = runs.get("ratios", {})
    over_rounds = {  # the median over rounds is judged; min-max goes along
        "orchestrated_vs_baseline": ratios.get("orchestrated_vs_baseline"),
        "choreographed_vs_baseline": ratios.get("choreographed_vs_baseline"),
        "orchestrated_step_overhead_ms": runs.get("orchestrated_step_overhead_ms"),
    }
    measured = {name: s and s.get("median") for name, s in over_rounds.items()}
    measured |= {
        "outbox_kick_p99_ms": results.get("outbox", {}).get("kick", {}).get("latency", {}).get("p99_ms"),
        "relay_drain_events_per_s": results.get("drain", {}).get("per_s"),
        "api_p99_ms": results.get("api", {}).get("latency", {}).get("p99_ms"),
        "embedded_vs_services_wall": results.get("embedded", {}).get("wall_ratio"),
    }
    out = {}
    for name, value in measured.items():
        if value is None:
            continue
        sense, target = targets[name]
        if sense not in ("at least", "at most"):
            raise ValueError(f"target {name}: sense {sense!r} is neither 'at least' nor 'at most'")
        met = value >= target if sense == "at least" else value <= target
        out[name] = {"value": value, "target": target, "sense": sense, "met": met}
        if over_rounds.get(name) and "min" in over_rounds[name]:
            out[name]["rounds_min_max"] = [over_rounds[name]["min"], over_rounds[name]["max"]]
    return out


def missed_sentence(verdicts: dict) -> str:
    """One plain sentence: every missed target with what was measured, or that all were met."""
    missed = [f"{name} is {v['value']}, the target is {v['sense']} {v['target']}" for name, v in verdicts.items() if not v["met"]]
    if not missed:
        return "All targets met."
    return f"**Missed {len(missed)} of {len(verdicts)} targets: " + "; ".join(missed) + ".**"


def without_samples(data):
    """The results minus the raw samples (keys starting with '_'), for the JSON file."""
    if isinstance(data, dict):
        return {k: without_samples(v) for k, v in data.items() if not k.startswith("_")}
    return data


def charts(results: dict, directory: Path, stem: str) -> list[Path]:
    """Per-round throughput and latency per saga variant, throughput across the concurrency sweep,
    latency distributions (CDF) per outbox mode and of the API."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    runs = headline(results)
    if runs:
        sweep = results["sagas"]["by_concurrency"]
        fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4))
        for variant, label in VARIANTS.items():
            r = runs["variants"][variant]
            _cdf(left, r["_latencies"], f"{label} (p99 {r['latency']['p99_ms']:.0f} ms)", color=COLOURS[variant])
        left.set(title=f"Released -> settled, {runs['concurrency']} worker processes", xlabel="seconds", ylabel="fraction of orders")
        left.legend(loc="lower right", fontsize="small")
        names = list(VARIANTS.values())
        medians = [runs["variants"][v]["per_s"]["median"] for v in VARIANTS]
        errors = [[m - runs["variants"][v]["per_s"]["min"] for m, v in zip(medians, VARIANTS, strict=True)],
                  [runs["variants"][v]["per_s"]["max"] - m for m, v in zip(medians, VARIANTS, strict=True)]]
        bars = middle.bar(names, medians, yerr=errors, capsize=4, color=[COLOURS[v] for v in VARIANTS])
        middle.bar_label(bars, fmt="%.0f", label_type="center")
        middle.set(title=f"Throughput, median and min-max of {runs['rounds']} rounds", ylabel="orders (chains) per second")
        middle.tick_params(axis="x", labelrotation=20)
        concurrencies = sorted(sweep, key=int)
        for variant, label in VARIANTS.items():
            right.plot([int(c) for c in concurrencies], [sweep[c]["variants"][variant]["per_s"]["median"] for c in concurrencies],
                       marker="o", label=label, color=COLOURS[variant])
        right.set(title="Throughput by worker processes (median)", xlabel="worker processes", ylabel="per second", yscale="log")
        right.set_xticks([int(c) for c in concurrencies])
        right.legend(fontsize="small")
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


def _cdf(ax, values, label: str, *, scale: float = 1.0, color: str | None = None) -> None:
    ordered = sorted(v * scale for v in values)
    if ordered:
        ax.plot(ordered, [(n + 1) / len(ordered) for n in range(len(ordered))], label=label, color=color)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


def _spread(s: dict, unit: str = "") -> str:
    return f"{s['median']}{unit} ({s['min']}-{s['max']})"


def markdown(results: dict, charts: list[Path], *, command: str, machine_line: str) -> str:
    lines = [f"# Benchmark: `{command}`", "", machine_line, f"Mode: {results['mode']}, wall time {results['wall_s']} s.", ""]
    lines.append("## Targets")
    lines.append("")
    lines.append("| target | measured | goal | met |")
    lines.append("|---|---|---|---|")
    for name, v in results["verdicts"].items():
        spread = f" (rounds {v['rounds_min_max'][0]}-{v['rounds_min_max'][1]})" if "rounds_min_max" in v else ""
        lines.append(f"| {name} | {v['value']}{spread} | {v['sense']} {v['target']} | {'yes' if v['met'] else '**NO**'} |")
    lines.append("")
    lines.append(missed_sentence(results["verdicts"]))
    lines.append("")
    runs = headline(results)
    if "reference" in results:
        lines += ["## Physical reference", "", f"- PostgreSQL, one client, one-row INSERT per commit: {results['reference']['pg_commits_per_s']:.0f} commits/s"]
        if runs:
            lines.append(f"- Celery chain of four no-op tasks: {_spread(runs['variants']['noop_chain']['per_s'])} chains/s (the `noop_chain` row below)")
        lines.append("")
    if runs:
        lines += _sagas_markdown(results["sagas"], runs)
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
            f"`POST /api/orders/` on gunicorn ({a['gunicorn_workers']} sync workers), open loop at {a['offered_rate']:.0f} requests/s for {a['requests']} requests after {a['warmup_s']:g} s of warm-up, with no worker running (the web tier alone, as on its own machine): "
            f"{a['throughput_per_s']} ok/s, statuses {a['statuses']}, p50 {a['latency']['p50_ms']} ms, p99 {a['latency']['p99_ms']} ms.",
            "",
        ]
    if "history" in results:
        from perf.history_bench import markdown as history_markdown

        lines += history_markdown(results["history"])
    if "embedded" in results:
        lines += embedded.markdown(results["embedded"])
    for chart in charts:
        lines.append(f"![{chart.stem}]({chart.name})")
    return "\n".join(lines)


def _sagas_markdown(sagas: dict, runs: dict) -> list[str]:
    c = runs["concurrency"]
    lines = [
        f"## Sagas at saturation (pm_ok, 1-3 lines per order, {c} worker processes)",
        "",
        f"{runs['rounds']} timed rounds of {runs['per_round']} orders per variant, after an untimed warm-up round of "
        f"{runs['warmup_per_round']}; in each round the variants take turns (who goes first rotates). A variant's orders are "
        "placed while the worker does not consume (Celery's cancel_consumer), so placement is outside the timed window; the "
        "clock runs from the first message the worker takes after add_consumer (a marker queued ahead of the orders) until the "
        "last order settled and the last of their outbox events was published. "
        "The fair baseline is a careful Celery chain with the same placement (order_place), the same service calls and outbox "
        "events, idempotent steps and a queued `link_error` compensation; the naive chain is the plain chain of before (no "
        "idempotency record, no outbox, inline compensation); the no-op chain is four tasks that do nothing (perf/baseline.py). "
        "Figures are the median and (min-max) over rounds; each ratio is taken round by round. Worker CPU is user + system time "
        "of the worker's main process and pool children over the window, per order. Latency is released -> settled, so at "
        "saturation it is mostly time spent queued.",
        "",
        "| variant | per second | per round | worker CPU ms per order | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        r = runs["variants"][variant]
        lines.append(
            f"| {variant} | {_spread(r['per_s'])} | {' / '.join(str(x) for x in r['rounds_per_s'])} | {_spread(r['cpu_ms_per_order'])} "
            f"| {r['latency']['p50_ms']} | {r['latency']['p99_ms']} |"
        )
    lines += ["", "| ratio (throughput) | median (min-max) | per round |", "|---|---|---|"]
    for name, r in runs["ratios"].items():
        lines.append(f"| {name} | {_spread(r)} | {' / '.join(str(x) for x in r['rounds'])} |")
    overhead = runs["orchestrated_step_overhead_ms"]
    cpu = runs["orchestrated_step_cpu_overhead_ms"]
    lines += [
        "",
        f"Engine overhead per step against the fair baseline, in worker time (the difference in wall time per order times {c} "
        f"processes, over 4 steps; the target): {_spread(overhead, ' ms')}; per round {' / '.join(str(x) for x in overhead['rounds'])} ms. "
        f"In worker CPU time: {_spread(cpu, ' ms')}; per round {' / '.join(str(x) for x in cpu['rounds'])} ms.",
        "",
    ]
    rss = runs.get("worker_rss_mib")
    if rss:
        lines += [f"Worker memory (RSS) at {c} processes: main process {rss['start']['main']} MiB before the rounds, {rss['end']['main']} MiB after; "
                  f"largest pool child {rss['start']['largest_child']} MiB before, {rss['end']['largest_child']} MiB after.", ""]
    sweep = sagas["by_concurrency"]
    lines += [
        "### By worker processes",
        "",
        "Medians over each concurrency's own rounds (after its own warm-up). With 2 cores, more processes than cores only add "
        "concurrency for the time tasks wait on PostgreSQL and Redis.",
        "",
        "| processes | rounds | " + " | ".join(f"{v} /s" for v in VARIANTS) + " | " + " | ".join(sweep[next(iter(sweep))]["ratios"]) + " |",
        "|---" * (2 + len(VARIANTS) + len(runs["ratios"])) + "|",
    ]
    for key in sorted(sweep, key=int):
        r = sweep[key]
        lines.append(
            f"| {key} | {r['rounds']} | " + " | ".join(str(r["variants"][v]["per_s"]["median"]) for v in VARIANTS) + " | "
            + " | ".join(_spread(x) for x in r["ratios"].values()) + " |"
        )
    lines.append("")
    return lines
