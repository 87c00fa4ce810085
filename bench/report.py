"""``docs/benchmarks.md`` from the result files: machine, targets, one section per benchmark."""
from __future__ import annotations

import json
from pathlib import Path

from bench.results import BenchResult, Measurement, Stats, Target

ISSUE_ITEMS = {
    1: "Pipelined vs sequential step",
    2: "Sampling overhead",
    3: "Weight sync",
    4: "Reward server",
    5: "Learner",
    6: "Scaling",
    7: "GPU section",
    8: "Learner memory",
}


def fmt(value) -> str:
    """A metric or parameter as table text: Stats as ``median [q1, q3]``, floats to 4 significant digits."""
    if isinstance(value, Stats):
        return f"{fmt(value.median)} [{fmt(value.q1)}, {fmt(value.q3)}]"
    if isinstance(value, bool) or value is None:
        return "—" if value is None else ("yes" if value else "no")
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), line(["---"] * len(header)), *(line(r) for r in rows)]


def _measurement_tables(measurements: list[Measurement]) -> list[str]:
    lines: list[str] = []
    groups: dict[str, list[Measurement]] = {}
    for m in measurements:
        groups.setdefault(m.group, []).append(m)
    for group, rows in groups.items():
        params = list(dict.fromkeys(k for m in rows for k in m.params))
        metrics = list(dict.fromkeys(k for m in rows for k in m.metrics))
        if group:
            lines += [f"**{group}**", ""]
        lines += _table(["variant", *params, *metrics],
                        [[m.name, *(fmt(m.params.get(k)) for k in params), *(fmt(m.metrics.get(k)) for k in metrics)] for m in rows])
        lines.append("")
    return lines


def _target_value(target: Target) -> str:
    return "—" if target.value is None else f"{fmt(float(target.value))}{target.unit}"


def _summary(results: list[BenchResult]) -> list[str]:
    rows = []
    for r in results:
        if r.status != "measured" and not r.targets:
            rows.append([str(r.item), r.name, "—", r.reason or r.status, "—"])
        targeted = {t.value for t in r.targets}
        if r.status == "measured" and not any(x.stats.median in targeted for x in r.ratios):
            for x in r.ratios:  # ratios that no target judges are reported as they are
                rows.append([str(r.item), x.name, f"(reported, no target) {x.description}", fmt(x.stats.median), "—"])
        for t in r.targets:
            measured = _target_value(t) if r.status == "measured" else (r.reason or r.status)
            rows.append([str(r.item), t.name, f"{t.description} ({t.comparison} {fmt(t.threshold)}{t.unit})", measured, fmt(t.met)])
    return _table(["item", "target", "aim", "measured", "met"], rows)


def _machine(results: list[BenchResult]) -> list[str]:
    envs = [r.environment for r in results if r.environment]
    if not envs:
        return ["No environment recorded."]
    env = envs[0]
    packages = ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items() if v)
    gpu = env.get("gpu")
    gpu_text = f"{gpu['name']} ({gpu['memory_gib']} GiB)" if gpu else "no GPU"
    dates = sorted(e["date_utc"] for e in envs if "date_utc" in e)
    loads = [e["load_average"][0] for e in envs if "load_average" in e] + [e["load_average_end"][0] for e in envs if "load_average_end" in e]
    commit = env.get("git_commit") or "unknown"
    dirty = " with uncommitted changes" if env.get("git_dirty") else ""
    others = sorted({f"{e.get('cpu_model')}, {e.get('usable_cpus')} usable CPUs" for e in envs} -
                    {f"{env.get('cpu_model')}, {env.get('usable_cpus')} usable CPUs"})
    mixed = [r.name for r in results if r.environment and r.environment.get("cpu_model") != env.get("cpu_model")]
    commits = sorted({(e.get("git_commit") or "unknown")[:12] for e in envs} - {commit[:12]})
    return [
        f"- Machine: {env.get('cpu_model')}, {env.get('usable_cpus')} usable of {env.get('logical_cpus')} logical CPUs, "
        f"{env.get('memory_gib')} GiB RAM, {gpu_text}; {env.get('platform')}"
        + (f"; but {', '.join(mixed)} ran on {'; '.join(others)} (compare ratios, not absolute times, across them)." if mixed else "."),
        f"- Software: Python {env.get('python')}; {packages}.",
        f"- Date: {dates[0]} to {dates[-1]} (UTC); code at commit `{commit[:12]}`{dirty}"
        + (f" (other results: {', '.join(f'`{c}`' for c in commits)})." if commits else "."),
        f"- 1-minute load average at the start and end of each benchmark: {min(loads):.1f} to {max(loads):.1f} "
        f"(on {env.get('usable_cpus')} CPUs; other jobs on the machine slow all variants of a comparison alike, "
        "absolute times depend on it)." if loads else "- Load average: not recorded.",
    ]


def _section(r: BenchResult) -> list[str]:
    lines = [f"## {r.item}. {r.title}", "", f"`bench/results/{r.name}.json` — status: **{r.status}**"
             + (f" ({r.reason})" if r.reason else "") + ".", ""]
    if r.status == "measured":
        lines += _measurement_tables(r.measurements)
    if r.ratios:
        lines += _table(["ratio", "median", "[q1, q3]", "n", "meaning"],
                        [[x.name, fmt(x.stats.median), f"[{fmt(x.stats.q1)}, {fmt(x.stats.q3)}]", str(x.stats.n), x.description]
                         for x in r.ratios])
        lines.append("")
    for t in r.targets:
        lines.append(f"- Target `{t.name}`: {t.description} {t.comparison} {fmt(t.threshold)}{t.unit}: measured "
                     f"{_target_value(t)}, met: {fmt(t.met)}." + (f" {t.note}" if t.note else ""))
    if r.targets:
        lines.append("")
    lines += [f"- {note.strip()}" for note in r.notes if note.strip()]
    settings = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in r.settings.items()
                         if len(json.dumps(v, default=str)) <= 160)
    if settings:
        lines.append(f"- Settings: {settings}.")
    if r.duration_s:
        lines.append(f"- Ran {r.duration_s:.0f} s; peak RSS of the benchmark process {fmt(r.peak_rss_mib)} MiB"
                     + (f", peak GPU memory {fmt(r.gpu_peak_mib)} MiB" if r.gpu_peak_mib is not None else "") + ".")
    lines.append("")
    return lines


def render(results: list[BenchResult]) -> str:
    """The whole page for ``results`` (ordered by issue item)."""
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m bench`) from `bench/results/*.json`; do not edit by hand",
        "(`python -m bench --report-only` rewrites it from the result files).",
        "",
        *_machine(results),
        "",
        "How to read the numbers: a timing is `median [q1, q3]` over the repeats after a discarded warm-up; a ratio is",
        "computed per repeat from variants run side by side in one process, interleaved, on identical work and seeds,",
        "then summarised the same way. Memory is peak resident set size (RSS) from the kernel, per variant in a fresh",
        "process where a table says so; GPU memory is torch's peak allocation. Units are in the column names.",
        "",
        "## Targets",
        "",
        *_summary(results),
        "",
    ]
    seen = {r.item for r in results}
    for r in results:
        lines += _section(r)
    for item, title in ISSUE_ITEMS.items():
        if item not in seen:
            lines += [f"## {item}. {title}", "", "No result file yet.", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(results: list[BenchResult], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(results))
    return path
