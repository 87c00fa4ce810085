"""``editrl eval``: score the base model and LoRA adapters on a prompt table with one or more
reward configs, and write ``results.json``, ``results.csv`` and ``report.html``.

Every arm (``base``, the policy with its adapter at the identity, and each ``--adapter DIR``,
a run's ``adapter/`` folder) edits every prompt with the same deterministic seeds: the
held-out evaluation's tasks (:func:`editrl.cluster.tasks.eval_tasks`: ODE sampling, one group of
``--seeds`` samples per prompt whose seeds depend only on the config's ``seed`` and the
prompt's place in the table), so arms are compared prompt by prompt and seed by seed. Each
reward config (a reward-server YAML, ``--reward-config``, repeatable; default the config's
``reward_server.config``) runs as its own reward server, started and stopped here; every one
scores the same edits (each group is sampled once), which gives their agreement. Statistics: :mod:`editrl.cluster.eval_stats`; report:
:mod:`editrl.cluster.eval_report`.

Runs in this process (no Ray): one rollout worker per arm, reading ``data.encode_cache`` when set.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from editrl.cluster.command_errors import error, one_line

logger = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
"""The file of an adapter directory ``--adapter`` reads (peft keys, as a run's ``adapter/`` holds)."""


def add_eval_parser(sub) -> None:
    """Add ``editrl eval`` to the CLI's subcommands."""
    ev = sub.add_parser("eval", help="score the base model and adapters on a prompt table; write results and report.html")
    ev.add_argument("--config", default="configs/default.yaml", help="YAML preset (TrainConfig): model, geometry, fps, seed")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ev.add_argument("--prompts", default=None, help="prompt table to score (default: the config's data.heldout_prompts)")
    ev.add_argument("--adapter", action="append", default=[], metavar="DIR", help="adapter directory (adapter_model.safetensors); repeatable")
    ev.add_argument("--no-base", action="store_true", help="do not score the base model")
    ev.add_argument("--reward-config", action="append", default=[], metavar="YAML",
                    help="reward-server config to score with; repeatable (default: the config's reward_server.config)")
    ev.add_argument("--seeds", type=int, default=None, help="seeds per prompt (default: the config's eval.seeds_per_prompt)")
    ev.add_argument("--max-prompts", type=int, default=None, help="score only the first N prompts")
    ev.add_argument("--videos", type=int, default=8, help="prompts whose source and edits the report shows (default 8)")
    ev.add_argument("--out", required=True, help="output folder")
    ev.set_defaults(func=cmd_eval)


def _arm_names(adapters: list[Path]) -> list[str]:
    """``<folder name>``, or ``<parent>/<folder>`` when two adapters share a folder name."""
    names = [a.name for a in adapters]
    return [f"{a.parent.name}/{a.name}" if names.count(a.name) > 1 else a.name for a in adapters]


def cmd_eval(args: argparse.Namespace) -> int:
    """``editrl eval``. Everything a user gives is checked before a model is built or a server
    started: the config and its geometry and checkpoint kind, the prompt table, each adapter
    directory, each reward config file.

    Returns:
        0 when every arm scored every prompt; 1 with one ``editrl: error:`` line otherwise.
    """
    from editrl.cluster.config import load_train_config, parse_overrides, with_resolved_paths
    from editrl.cluster.preflight import PreflightError, check_geometry, checkpoint_dir
    from editrl.cluster.checkpoint_kind import checkpoint_widened
    from editrl.protocol.prompt_table import read_prompt_table
    from editrl.resources import resolve_path

    try:
        overrides = parse_overrides(args.set)
        if args.seeds is not None:
            overrides["eval.seeds_per_prompt"] = args.seeds
        config = with_resolved_paths(load_train_config(args.config, overrides))
        if config.policy.checkpoint is not None:
            checkpoint_widened(config.policy, checkpoint_dir(config.policy.checkpoint))
        check_geometry(config.policy)
        prompts = resolve_path(args.prompts) if args.prompts else Path(config.data.heldout_prompts)
        read_prompt_table(prompts)
        adapters = [resolve_path(a) for a in args.adapter]
        for adapter in adapters:
            if not (adapter / ADAPTER_FILE).is_file():
                raise FileNotFoundError(f"--adapter {adapter}: no {ADAPTER_FILE} in it (a run writes one into <run>/adapter/)")
        rewards = [resolve_path(r) for r in args.reward_config] or [Path(config.reward_server.config)]
        for reward in rewards:
            if not reward.is_file():
                raise FileNotFoundError(f"--reward-config {reward}: no such file")
        if len({r.stem for r in rewards}) != len(rewards):
            raise ValueError(f"--reward-config: the files need distinct names, got {[r.name for r in rewards]}")
        if args.no_base and not adapters:
            raise ValueError("--no-base needs at least one --adapter")
        if args.max_prompts is not None and args.max_prompts < 1:
            raise ValueError(f"--max-prompts {args.max_prompts}: must be at least 1")
    except (ValueError, OSError, PreflightError) as exc:
        return error(one_line(exc))
    arms = ([] if args.no_base else [("base", None)]) + list(zip(_arm_names(adapters), adapters))
    out = Path(args.out)
    report = run_eval(config, prompts, arms, rewards, out, max_prompts=args.max_prompts, videos=args.videos)
    sys.stdout.write(f"{report}\n")
    return 0


def run_eval(config, prompts: Path, arms: list[tuple[str, Path | None]], reward_configs: list[Path], out: Path,
             max_prompts: int | None = None, videos: int = 8) -> Path:
    """Score every arm on ``prompts`` with every reward config and write the results and the report.

    Args:
        config: the :class:`~editrl.cluster.config.TrainConfig` (paths resolved).
        prompts: the prompt table.
        arms: ``(name, adapter directory or None for the base model)``, in report order.
        reward_configs: reward-server YAML files; the first is the primary one.
        out: output folder (``results.json``, ``results.csv``, ``report.html``, ``media/``, ``logs/``).
        max_prompts: score only the first N prompts.
        videos: prompts whose source and edits go into the report.

    Returns:
        The path of ``report.html``.

    Raises:
        RuntimeError: a reward server did not start, or a group failed (naming the prompt).
    """
    import contextlib
    import dataclasses

    from editrl.cluster.eval_report import write_report
    from editrl.cluster.eval_stats import build_results, write_results
    from editrl.cluster.reward_process import RewardServerProcess
    from editrl.protocol.dataset import PromptDataset
    from editrl.rollout_workers.reward_client import RewardClient

    policy = config.policy
    dataset = PromptDataset(prompts, policy.num_frames, policy.height, policy.width, fps=config.fps)
    count = len(dataset.rows) if max_prompts is None else min(max_prompts, len(dataset.rows))
    config = config.model_copy(update={"eval": config.eval.model_copy(update={"max_prompts": count})})
    (out / "logs").mkdir(parents=True, exist_ok=True)
    samples, media = [], {}
    rc = config.rollout
    with contextlib.ExitStack() as stack:
        clients = []
        for reward_config in reward_configs:
            url = stack.enter_context(RewardServerProcess(reward_config, out / "logs" / f"reward_server_{reward_config.stem}.log",
                                                          config.reward_server.startup_timeout_s))
            clients.append(stack.enter_context(RewardClient(url, timeout_s=rc.reward_timeout_s, max_attempts=rc.reward_max_attempts)))
        for arm, adapter in arms:
            per_config = _score_arm(config, dataset, arm, adapter, clients, keep_frames=videos)
            for reward_config, groups in zip(reward_configs, per_config):
                samples += _samples(groups, dataset, arm, reward_config.stem)
            _save_media(out, per_config[0], dataset, arm, media, config.fps)
    write_results(out, samples, [a for a, _ in arms])
    results = build_results(samples, [a for a, _ in arms])
    ordered = [media[row.prompt_id] for row in dataset.rows if row.prompt_id in media]
    return write_report(out, results, [dataclasses.replace(m, seed=0) for m in ordered])


def _score_arm(config, dataset, arm: str, adapter: Path | None, clients: list, keep_frames: int) -> list[list]:
    """One arm's groups, per reward server of ``clients``: a rollout worker in this process with
    the adapter loaded samples the eval tasks once, and every server scores the same edits."""
    import torch
    from safetensors.torch import load_file

    from editrl.cluster.inflight import rollout_engine
    from editrl.cluster.tasks import eval_tasks
    from editrl.policy.adapter import adapter_checksum
    from editrl.cluster.train import load_datasets, run_corpus
    from editrl.protocol.rollout import GroupFailure
    from editrl.resources import bundled_root
    from editrl.rollout_workers.worker import RolloutWorker

    rc = config.rollout
    # the training run's corpus (a model built in code tokenizes with a vocabulary made from it)
    corpus = run_corpus(*load_datasets(config)) if config.policy.checkpoint is None else []
    worker = RolloutWorker(0, config.policy, corpus, str(bundled_root()), clients[0].base_url, reward_timeout_s=rc.reward_timeout_s,
                           reward_max_attempts=rc.reward_max_attempts, torch_threads=rc.torch_threads, fps=config.fps,
                           seed=config.seed, video_format=rc.reward_video_format, engine=rollout_engine(rc),
                           device="cuda" if torch.cuda.is_available() else "cpu", encode_cache=config.data.encode_cache)
    state = load_file(str(adapter / ADAPTER_FILE)) if adapter is not None else worker.policy.adapter_state()
    worker.set_adapter(state, 0, adapter_checksum(state))
    per_config = worker.sample_scored_by(eval_tasks(config, dataset, 0, keep_frames), clients)
    for results in per_config:
        failed = [r for r in results if isinstance(r, GroupFailure)]
        if failed:
            raise RuntimeError(f"arm {arm}: {len(failed)} prompts failed, first {failed[0].task.prompt_id}: {failed[0].reason}")
    logger.info("arm %s: %d prompts scored by %d reward configs", arm, len(per_config[0]), len(clients))
    return per_config


def _samples(groups, dataset, arm: str, reward_config: str) -> list:
    """One :class:`~editrl.cluster.eval_stats.EvalSample` per sample of each group (its seed: its index in the group)."""
    from editrl.cluster.eval_stats import EvalSample

    samples = []
    for group in groups:
        row = dataset.by_id(group.task.prompt_id)
        for j, reward in enumerate(group.rewards.tolist()):
            dims = {name: float(values[j]) for name, values in group.reward_dimensions.items() if values[j] is not None}
            samples.append(EvalSample(arm=arm, prompt_id=row.prompt_id, edit_category=row.edit_category or row.edit_type,
                                      seed=j, reward=float(reward), dimensions=dims, reward_config=reward_config))
    return samples


def _save_media(out: Path, groups, dataset, arm: str, media: dict, fps: int) -> None:
    """``media/<prompt>/source.mp4`` and ``media/<prompt>/<arm>.mp4`` (the edit of seed 0) with PNG posters (first frames)."""
    from PIL import Image

    from editrl.cluster.eval_report import MediaFile, PromptMedia
    from editrl.protocol.video import encode_mp4

    for group in groups:
        if group.frames is None:
            continue
        prompt_id = group.task.prompt_id
        folder = out / "media" / prompt_id.replace("/", "_")
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, frames in (("source", group.frames[0]), (arm.replace("/", "_"), group.frames[1])):
            (folder / f"{name}.mp4").write_bytes(encode_mp4(frames, fps=fps))
            Image.fromarray(frames[0]).resize((frames.shape[2] * 4, frames.shape[1] * 4), Image.NEAREST).save(folder / f"{name}.png")
            files[name] = MediaFile(video=str((folder / f"{name}.mp4").relative_to(out)), poster=str((folder / f"{name}.png").relative_to(out)))
        entry = media.setdefault(prompt_id, PromptMedia(prompt_id, dataset.by_id(prompt_id).instruction, files["source"]))
        entry.edits[arm] = files[arm.replace("/", "_")]
