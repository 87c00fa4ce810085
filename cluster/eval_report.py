"""``report.html`` of ``editrl eval``: the tables and plots of ``results.json``
(:func:`editrl.cluster.eval_stats.build_results`) and, per prompt, the source clip
next to each arm's edit.

The page is one file with inline CSS and no scripts; it loads nothing from the network.
The plots (PNG, matplotlib's Agg canvas) go to ``plots/`` next to it, and the videos and
posters are the caller's files, referenced by paths relative to the report's folder.
"""
from __future__ import annotations

import html
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from editrl.cluster.eval_stats import ALL, REWARD, category_label

logger = logging.getLogger(__name__)

CATEGORY_PLOT = "plots/category_reward.png"
DIMENSION_PLOT = "plots/dimensions.png"
HEADER_BACKGROUND = "#e4ebf5"  # table headers' background colour

STYLE = f"""
body {{ font-family: sans-serif; margin: 16px 24px; color: #111; background: #fff; }}
h1 {{ font-size: 22px; margin: 0 0 6px; }} h2 {{ font-size: 17px; margin: 18px 0 6px; }}
h3 {{ font-size: 14px; margin: 10px 0 4px; }} p.meta {{ margin: 0; color: #444; font-size: 13px; }}
table {{ border-collapse: collapse; font-size: 13px; margin-bottom: 6px; }}
th, td {{ border: 1px solid #bbb; padding: 3px 8px; text-align: right; }}
th {{ background: {HEADER_BACKGROUND}; }} td.name {{ text-align: left; font-weight: bold; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 12px; }} .plots img {{ width: 540px; }}
.edits {{ display: flex; flex-wrap: wrap; gap: 10px; }}
figure {{ margin: 0; }} video {{ width: 192px; height: 192px; background: #000; display: block; }}
figcaption {{ font-size: 12px; text-align: center; max-width: 192px; }}
"""


@dataclass(frozen=True)
class MediaFile:
    """A clip and its poster image, as paths relative to the report's folder."""

    video: str
    poster: str


@dataclass(frozen=True)
class PromptMedia:
    """What one prompt's row shows: the source clip and each arm's edit (arm -> media).

    ``seed`` is the seed of the edits shown: the captions give that sample's reward;
    with ``None`` they give the prompt's mean over its seeds.
    """

    prompt_id: str
    instruction: str
    source: MediaFile
    edits: dict[str, MediaFile] = field(default_factory=dict)
    seed: int | None = None


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _url(path: str) -> str:
    return _esc(quote(PurePosixPath(path).as_posix()))


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _fmt(value: float | None) -> str:
    return f"{value:.3f}" if _finite(value) else "n/a"


def _mean_sem(row: Mapping | None) -> tuple[str, str]:
    """Cell text ``mean ± sem`` and its tooltip."""
    if row is None:
        return "", ""
    return f"{_fmt(row['mean'])} ± {_fmt(row['sem'])}", f"{row['n_prompts']} prompts, {row['n_samples']} samples"


def _table(css_class: str, header: Sequence[str], rows: Sequence[Sequence[tuple[str, str]]],
           config: str | None = None) -> str:
    """A table; each row is a sequence of (text, tooltip) cells, the first one a name."""
    attr = f' data-reward-config="{_esc(config)}"' if config is not None else ""
    lines = [f'<table class="{css_class}"{attr}>', "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"]
    for cells in rows:
        (name, _), rest = cells[0], cells[1:]
        tds = "".join(f'<td title="{_esc(tip)}">{_esc(text)}</td>' for text, tip in rest)
        lines.append(f'<tr><td class="name">{_esc(name)}</td>{tds}</tr>')
    lines.append("</table>")
    return "\n".join(lines)


def _summary_index(results: Mapping) -> dict[tuple[str, str, str, str], Mapping]:
    return {(r["reward_config"], r["arm"], r["category"], r["metric"]): r for r in results["summary"]}


def _bar_chart(ax, groups: Sequence[str], arms: Sequence[str], means: np.ndarray, sems: np.ndarray,
               title: str) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per arm, SEM error bars.
    ``means``/``sems`` are ``(len(arms), len(groups))``; NaN means no bar / no error bar."""
    width = 0.8 / max(len(arms), 1)
    x = np.arange(len(groups))
    for i, arm in enumerate(arms):
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, np.nan_to_num(means[i]), width,
               yerr=np.nan_to_num(sems[i]), capsize=3, label=arm)
    ax.set_xticks(x, groups, rotation=20 if len(groups) > 4 else 0, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)


def _plot(path: Path, panels: Sequence[tuple[str, Sequence[str], np.ndarray, np.ndarray]],
          arms: Sequence[str], ylabel: str) -> None:
    """One figure, one bar chart per panel (title, groups, means, sems), saved as PNG."""
    fig = Figure(figsize=(5.4, 3.0 * len(panels)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (title, groups, means, sems) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        _bar_chart(ax, groups, arms, means, sems, title)
        ax.set_ylabel(ylabel, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _grid(index: Mapping, config: str, arms: Sequence[str], keys: Sequence[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """``(means, sems)`` ``(len(arms), len(keys))`` of the summary rows (category, metric)."""
    def value(arm: str, key: tuple[str, str], name: str) -> float:
        row = index.get((config, arm, *key))
        return row[name] if row is not None and _finite(row[name]) else math.nan
    return (np.array([[value(a, k, "mean") for k in keys] for a in arms], dtype=np.float64),
            np.array([[value(a, k, "sem") for k in keys] for a in arms], dtype=np.float64))


def _write_plots(directory: Path, results: Mapping) -> list[str]:
    """The category and dimension bar charts; returns their relative paths."""
    index, arms, configs = _summary_index(results), results["arms"], results["reward_configs"]
    titled = len(configs) > 1
    categories = results["categories"]
    panels = [(f"overall reward by category ({c})" if titled else "overall reward by category", categories,
               *_grid(index, c, arms, [(cat, REWARD) for cat in categories])) for c in configs]
    _plot(directory / CATEGORY_PLOT, panels, arms, "mean reward ± SEM")
    written = [CATEGORY_PLOT]
    dimensions = [m for m in results["metrics"] if m != REWARD]
    if dimensions:
        panels = [(f"dimensions, all categories ({c})" if titled else "dimensions, all categories", dimensions,
                   *_grid(index, c, arms, [(ALL, d) for d in dimensions])) for c in configs]
        _plot(directory / DIMENSION_PLOT, panels, arms, "mean score ± SEM")
        written.append(DIMENSION_PLOT)
    return written


def _tables(results: Mapping) -> list[str]:
    index, arms, configs = _summary_index(results), results["arms"], results["reward_configs"]
    categories, dimensions = results["categories"], [m for m in results["metrics"] if m != REWARD]
    parts = []
    for config in configs:
        suffix = f" — reward config {config}" if len(configs) > 1 else ""
        parts.append(f"<h2>Overall reward by category{_esc(suffix)}</h2>")
        rows = [[(arm, "")] + [_mean_sem(index.get((config, arm, c, REWARD))) for c in categories] for arm in arms]
        parts.append(_table("category-reward", ["arm", *categories], rows, config))
        if dimensions:
            parts.append(f"<h2>Reward dimensions by category{_esc(suffix)}</h2>")
            rows = [[(f"{arm} / {c}", "")] + [_mean_sem(index.get((config, arm, c, d))) for d in dimensions]
                    for arm in arms for c in categories
                    if any((config, arm, c, d) in index for d in dimensions)]
            parts.append(_table("dimensions", ["arm / category", *dimensions], rows, config))
    # each arm against every arm listed before it (the reverse pair is its mirror image)
    order = {arm: i for i, arm in enumerate(arms)}
    paired = [p for p in results.get("paired_differences", []) if order.get(p["arm_a"], 0) > order.get(p["arm_b"], 0)]
    if paired:
        parts.append("<h2>Paired differences (A − B, per prompt, mean over seeds)</h2>")
        rows = [[(f"{p['arm_a']} − {p['arm_b']}", ""), (p["reward_config"], ""), (p["metric"], ""),
                 (f"{_fmt(p['mean'])} ± {_fmt(p['sem'])}", "mean ± SE over prompts"), (str(p["n"]), ""),
                 (f"{p['wins']} / {p['losses']} / {p['ties']}", "prompts where A is higher / lower / equal"),
                 (_fmt(p["p_value"]), "two-sided sign test")] for p in paired]
        parts.append(_table("paired", ["A − B", "reward config", "metric", "difference ± SE", "prompts",
                                       "wins / losses / ties", "sign test p"], rows))
    if results.get("agreement"):
        parts.append("<h2>Agreement of reward configs (Spearman's rho, same outputs)</h2>")
        rows = [[(f"{a['config_a']} vs {a['config_b']}", ""), (a["metric"], ""), (_fmt(a["rho"]), ""),
                 (f"[{_fmt(a['low'])}, {_fmt(a['high'])}]", f"percentile bootstrap, {a['n_boot']} resamples"),
                 (str(a["n"]), "")] for a in results["agreement"]]
        parts.append(_table("agreement", ["configs", "metric", "rho", "95% interval", "outputs"], rows))
    return parts


def _caption_reward(results: Mapping, arm: str, prompt_id: str, seed: int | None) -> str:
    """The reward of ``arm``'s edit of the prompt under each config: of ``seed``'s
    sample, or the mean over the prompt's seeds."""
    texts = []
    for config in results["reward_configs"]:
        scores = [s["reward"] for s in results["samples"] if s["arm"] == arm and s["prompt_id"] == prompt_id
                  and s["reward_config"] == config and (seed is None or s["seed"] == seed)]
        if not scores:
            continue
        label = f"{config}: " if len(results["reward_configs"]) > 1 else ""
        mean = f" (mean of {len(scores)} seeds)" if seed is None and len(scores) > 1 else ""
        texts.append(f"{label}reward {_fmt(float(np.mean(scores)))}{mean}")
    return "; ".join(texts) or "no score"


def _figure(media: MediaFile, caption: str, kind: str) -> str:
    return (f'<figure class="{kind}"><video src="{_url(media.video)}" poster="{_url(media.poster)}" '
            f'controls muted loop playsinline preload="metadata"></video>'
            f"<figcaption>{caption}</figcaption></figure>")


def _edits(results: Mapping, videos: Sequence[PromptMedia]) -> list[str]:
    categories = {s["prompt_id"]: category_label(s["edit_category"]) for s in results["samples"]}
    parts = ["<h2>Edits (source, then each arm)</h2>"]
    for prompt in videos:
        arms = [a for a in results["arms"] if a in prompt.edits] + [a for a in prompt.edits if a not in results["arms"]]
        seed = f", seed {prompt.seed}" if prompt.seed is not None else ""
        parts.append(f'<div class="prompt" data-prompt-id="{_esc(prompt.prompt_id)}">'
                     f"<h3>{_esc(prompt.prompt_id)} ({_esc(categories.get(prompt.prompt_id, 'no samples'))}{_esc(seed)}): "
                     f"{_esc(prompt.instruction)}</h3>")
        figures = [_figure(prompt.source, "<b>source</b>", "source")]
        figures += [_figure(prompt.edits[arm], f"<b>{_esc(arm)}</b><br>"
                            f"{_esc(_caption_reward(results, arm, prompt.prompt_id, prompt.seed))}", "edit")
                    for arm in arms]
        parts.append('<div class="edits">' + "".join(figures) + "</div></div>")
    return parts


def _check_media(directory: Path, videos: Sequence[PromptMedia]) -> None:
    paths = [p for m in videos for f in (m.source, *m.edits.values()) for p in (f.video, f.poster)]
    bad = [p for p in paths if PurePosixPath(p).is_absolute() or ".." in PurePosixPath(p).parts]
    if bad:
        raise ValueError(f"media paths must be relative to the report's folder, without '..': {bad}")
    missing = [p for p in paths if not (directory / p).is_file()]
    if missing:
        raise FileNotFoundError(f"media files missing under {directory}: {missing}")


def write_report(directory: str | Path, results: Mapping, videos: Mapping[str, PromptMedia] | Sequence[PromptMedia]) -> Path:
    """Write ``report.html`` and its plots (``plots/category_reward.png`` and, with
    reward dimensions, ``plots/dimensions.png``) into ``directory``.

    Args:
        directory: the report's folder (created if missing); media paths are relative to it.
        results: what ``results.json`` holds (:func:`editrl.cluster.eval_stats.build_results`).
        videos: per prompt (prompt_id -> media, or a sequence in display order) the
            source clip and the arms' edits: MP4 files with PNG posters.

    Returns:
        the path of ``report.html``.

    Raises:
        ValueError: an absolute media path or one with ``..``.
        FileNotFoundError: a media file that is not in ``directory``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    videos = list(videos.values()) if isinstance(videos, Mapping) else list(videos)
    _check_media(directory, videos)
    plots = _write_plots(directory, results)
    prompts = len({s["prompt_id"] for s in results["samples"]})
    body = [
        "<h1>Evaluation report</h1>",
        f'<p class="meta">arms: {_esc(", ".join(results["arms"]))} · reward configs: '
        f'{_esc(", ".join(results["reward_configs"]))} · {prompts} prompts · {len(results["samples"])} samples · '
        "mean ± SEM over prompts (each prompt's seeds averaged first)</p>",
        *_tables(results),
        "<h2>Plots</h2>",
        '<div class="plots">' + "".join(f'<img src="{_url(p)}" alt="{_esc(Path(p).stem)}">' for p in plots) + "</div>",
        *(_edits(results, videos) if videos else []),
    ]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>Evaluation report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    path = directory / "report.html"
    path.write_text(page, encoding="utf-8")
    logger.info("wrote %s (%d prompts with media, plots %s)", path, len(videos), ", ".join(plots))
    return path
