"""Everything a run writes into its run directory besides checkpoints:
metrics (TensorBoard + JSONL), the Parquet log of every rollout, sample videos,
the reward plot and ``summary.json``."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch.utils.tensorboard import SummaryWriter

from editrl.protocol.rollout import Group
from editrl.protocol.video import encode_mp4

logger = logging.getLogger(__name__)

ROLLOUT_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("group_id", pa.string()),
        ("prompt_id", pa.string()),
        ("sample", pa.int64()),
        ("policy_version", pa.int64()),
        ("trained_at_version", pa.int64()),
        ("staleness", pa.int64()),
        ("worker_id", pa.int64()),
        ("seed", pa.int64()),
        ("reward", pa.float64()),
        ("dimensions_json", pa.string()),
        ("reward_config_version", pa.string()),
        ("sampler", pa.string()),
        ("eta", pa.float64()),
        ("guidance_scale", pa.float64()),
        ("stochastic_steps", pa.list_(pa.int64())),
        ("log_prob_mean", pa.float64()),
        ("log_prob_min", pa.float64()),
        ("log_prob_max", pa.float64()),
    ]
)


class MetricsLog:
    """Scalars to TensorBoard event files and to ``metrics.jsonl`` (one object per record)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        path = run_dir / "metrics.jsonl"
        if resume_step is not None and path.exists():
            # a resumed run rewrites what came after its checkpoint
            kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        self.jsonl = path.open("a")

    def histogram(self, step: int, name: str, values: list[float]) -> None:
        """A TensorBoard histogram (e.g. the staleness of a step's groups)."""
        if values:
            self.writer.add_histogram(name, np.asarray(values, dtype=np.float64), step)

    def log(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        """Write ``metrics`` for ``step``; keys are namespaced ``kind/key`` in TensorBoard."""
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{kind}/{key}", value, step)
        self.jsonl.write(json.dumps({"kind": kind, "step": step, **metrics}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()


class RolloutLog:
    """One Parquet file per step under ``rollouts/`` with a row per trajectory.

    Each step's file is complete once written, so a run that stops early keeps
    every trajectory logged so far; ``pyarrow.parquet.read_table(run_dir / "rollouts")``
    reads them all as one table.
    """

    def __init__(self, directory: Path, resume_step: int | None = None):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            for path in directory.glob("step_*.parquet"):
                if int(path.stem.split("_")[1]) > resume_step:
                    path.unlink()

    def append(self, step: int, groups: list[Group], trained_at_version: int) -> None:
        rows: dict[str, list] = {name: [] for name in ROLLOUT_SCHEMA.names}
        for group in groups:
            stochastic = group.log_probs[:, group.sde_mask]
            for i in range(group.rewards.shape[0]):
                lp = stochastic[i]
                rows["step"].append(step)
                rows["group_id"].append(group.task.group_id)
                rows["prompt_id"].append(group.task.prompt_id)
                rows["sample"].append(i)
                rows["policy_version"].append(group.policy_version)
                rows["trained_at_version"].append(trained_at_version)
                rows["staleness"].append(trained_at_version - group.policy_version)
                rows["worker_id"].append(group.worker_id)
                rows["seed"].append(group.task.seed)
                rows["reward"].append(float(group.rewards[i]))
                rows["dimensions_json"].append(json.dumps({k: v[i] for k, v in group.reward_dimensions.items()}))
                rows["reward_config_version"].append(group.reward_config_version)
                rows["sampler"].append(group.sampler.sampler)
                rows["eta"].append(group.sampler.eta)
                rows["guidance_scale"].append(group.sampler.guidance_scale)
                rows["stochastic_steps"].append([t for t, s in enumerate(group.sampler.stochastic) if s])
                rows["log_prob_mean"].append(float(lp.mean()) if lp.numel() else float("nan"))
                rows["log_prob_min"].append(float(lp.min()) if lp.numel() else float("nan"))
                rows["log_prob_max"].append(float(lp.max()) if lp.numel() else float("nan"))
        if rows["step"]:
            pq.write_table(pa.table(rows, schema=ROLLOUT_SCHEMA), self.directory / f"step_{step:06d}.parquet")


def reward_stats(groups: list[Group]) -> dict[str, float]:
    """Mean and std of the scalar reward and of each dimension (over applicable samples)."""
    rewards = np.concatenate([g.rewards.numpy() for g in groups])
    stats = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std())}
    names = sorted({k for g in groups for k in g.reward_dimensions})
    for name in names:
        values = [v for g in groups for v in g.reward_dimensions.get(name, []) if v is not None]
        if values:
            stats[f"{name}_mean"] = float(np.mean(values))
            stats[f"{name}_std"] = float(np.std(values))
    return stats


def paired_gain(initial: dict[str, float], final: dict[str, float]) -> dict[str, float]:
    """Held-out gain paired by prompt: the same prompts and seeds are evaluated at the
    start and the end, so the per-prompt differences ``d_p = final_p - initial_p``
    (of each prompt's mean reward over its seeds) measure the change without the
    spread between prompts.

    Args:
        initial, final: mean reward (0-10) per prompt id; only prompts in both count.

    Returns:
        ``heldout_paired_gain`` (mean of ``d_p``), ``heldout_paired_gain_sem``
        (``std(d_p, ddof=1) / sqrt(n)``, the standard error over prompts),
        ``heldout_prompts_improved`` (share of prompts with ``d_p > 0``) and
        ``heldout_paired_prompts`` (``n``).

    Raises:
        ValueError: fewer than two prompts in common.
    """
    common = sorted(set(initial) & set(final))
    if len(common) < 2:
        raise ValueError(f"a paired gain needs at least two prompts evaluated at both ends, got {len(common)}")
    d = np.array([final[p] - initial[p] for p in common], dtype=np.float64)
    return {
        "heldout_paired_gain": float(d.mean()),
        "heldout_paired_gain_sem": float(d.std(ddof=1) / math.sqrt(len(d))),
        "heldout_prompts_improved": float((d > 0).mean()),
        "heldout_paired_prompts": float(len(d)),
    }


def save_side_by_side(path: Path, source: np.ndarray, edited: np.ndarray, fps: int) -> None:
    """Write ``source | edited`` (both ``uint8 (F, H, W, 3)``) as one mp4."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mp4(np.concatenate([source, edited], axis=2), fps=fps))


def plot_rewards(metrics_path: Path, out_path: Path) -> None:
    """Plot train reward (mean +- std per step) and held-out reward (mean +- SEM) over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if r["kind"] == "train" and "reward_mean" in r]
    heldout = [r for r in records if r["kind"] == "heldout"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        steps = np.array([r["step"] for r in train])
        mean = np.array([r["reward_mean"] for r in train])
        std = np.array([r["reward_std"] for r in train])
        ax.plot(steps, mean, label="train reward (mean over samples)", color="tab:blue")
        ax.fill_between(steps, mean - std, mean + std, color="tab:blue", alpha=0.15)
    if heldout:
        ax.errorbar(
            [r["step"] for r in heldout], [r["reward_mean"] for r in heldout], yerr=[r["reward_sem"] for r in heldout],
            label="held-out reward (ODE, mean +- SEM)", color="tab:orange", marker="o", capsize=3,
        )
    ax.set_xlabel("policy version (learner step)")
    ax.set_ylabel("reward (0-10)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)


def write_contact_sheet(samples_dir: Path, out_path: Path, instructions: dict[str, str], frame_scale: int = 2) -> Path | None:
    """A PNG of the held-out edits before and after training: one row per prompt that has both
    ``heldout_initial_<prompt>.mp4`` and ``heldout_final_<prompt>.mp4`` in ``samples_dir`` (the
    ``source | edit`` clips :func:`save_side_by_side` writes), showing the source's frames, the
    initial edit's and the final edit's, each a strip of all frames left to right, upscaled
    ``frame_scale`` times (nearest neighbour), under the prompt's id and instruction.

    Returns:
        ``out_path``, or None (nothing written) when no prompt has both clips.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from editrl.protocol.video import read_video

    prompts = sorted(p.name[len("heldout_initial_"):-len(".mp4")] for p in samples_dir.glob("heldout_initial_*.mp4"))
    prompts = [p for p in prompts if (samples_dir / f"heldout_final_{p}.mp4").is_file()]
    if not prompts:
        return None

    def strips(path: Path) -> tuple[np.ndarray, np.ndarray]:
        clip = read_video(str(path))  # (F, H, 2W, 3): source | edit
        width = clip.shape[2] // 2
        strip = lambda frames: np.concatenate(list(frames), axis=1).repeat(frame_scale, 0).repeat(frame_scale, 1)  # noqa: E731
        return strip(clip[:, :, :width]), strip(clip[:, :, width:])

    columns = ("source", "initial edit", "final edit")
    fig, axes = plt.subplots(len(prompts), 3, figsize=(15, 1.9 * len(prompts) + 0.4), dpi=100, squeeze=False)
    for row, prompt in zip(axes, prompts):
        source, initial = strips(samples_dir / f"heldout_initial_{prompt}.mp4")
        _, final = strips(samples_dir / f"heldout_final_{prompt}.mp4")
        for ax, image, title in zip(row, (source, initial, final), columns):
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(title, fontsize=9)
        row[0].set_ylabel(prompt, fontsize=8)
        row[1].set_xlabel(instructions.get(prompt, ""), fontsize=8)
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
