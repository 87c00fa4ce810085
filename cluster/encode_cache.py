"""``editrl data cache``: precompute the source latents and instruction embeddings of a prompt table.

``editrl data cache TABLE [TABLE ...] --config X --out DIR`` decodes every row's clip as the
rollout workers do (:func:`editrl.protocol.dataset.load_clip` at the config's geometry and
``fps``, the row's ``start_s`` / ``end_s``), encodes it with the policy's VAE (posterior mode,
:meth:`~editrl.policy.policy.EditPolicy.encode_video`) and its instruction with the text encoder
(:meth:`~editrl.policy.policy.EditPolicy.encode_text`; the empty instruction too, the CFG null
condition). Each distinct clip and instruction is encoded once, in parallel with Ray Data: a pool
of ``--workers`` actors (each reserving what ``topology.rollout`` gives a rollout worker, on CUDA
when that has GPUs) builds the policy once and takes ``--batch-size`` items at a time. A local Ray
is started unless one is running in this process or ``--address`` names a cluster to join.

Each batch becomes one ``shard-XXXXX.safetensors`` (written by the driver, so ``DIR`` need only be
on the driver's machine; the tensors are listed in :mod:`editrl.rollout_workers.encode_cache`);
``manifest.json`` comes last: the policy's fingerprint, the keys of every row, the shard of every
key, and the rows that could not be cached (schema problem, missing, undecodable or too short
clip), each also printed on one line. A run reads the directory through ``data.encode_cache``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np

from editrl.cluster.command_errors import error, one_line

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 4
"""Clips and instructions per Ray Data batch (one shard each), unless ``--batch-size`` says."""


def add_cache_parser(commands) -> None:
    """Add ``cache`` to the ``editrl data`` subcommands."""
    cache = commands.add_parser("cache", help="precompute a prompt table's source latents and instruction embeddings")
    cache.add_argument("tables", nargs="+", metavar="TABLE",
                       help="prompt table(s): .parquet, .jsonl or .csv (e.g. a run's train and held-out tables)")
    cache.add_argument("--config", default="configs/default.yaml",
                       help="YAML preset whose policy, geometry and fps to encode for")
    cache.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. fps=16")
    cache.add_argument("--out", required=True, help="output folder (shard-*.safetensors, manifest.json)")
    cache.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto); default: a local Ray")
    cache.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                       help=f"clips and instructions per batch and shard (default {DEFAULT_BATCH_SIZE})")
    cache.add_argument("--workers", type=int, default=None, help="encoding actors (default: topology.rollout.workers)")
    cache.set_defaults(func=cmd_data_cache)


class ShardEncoder:
    """The Ray Data callable: builds the policy once per actor and turns a batch of items into one shard.

    Args:
        policy_config: the run's :class:`~editrl.policy.config.PolicyConfig` (paths resolved).
        corpus: instructions a model built in code makes its vocabulary from.
        root: directory a relative checkpoint path resolves against.
        seed: seed of a model built in code.
        fps: rate clips are sampled at.
        device: torch device of the encoders (``cpu`` or ``cuda``).
        torch_threads: CPU threads of torch in the actor.
    """

    def __init__(self, policy_config, corpus: list[str], root: str, seed: int, fps: int, device: str, torch_threads: int):
        import torch

        from editrl.policy.policy import EditPolicy
        from editrl.rollout_workers.encode_cache import checkpoint_path, policy_fingerprint

        torch.set_num_threads(torch_threads)
        path = checkpoint_path(policy_config, root)
        # the DiT is never run here: a checkpoint's DiT weights are not read (but two experts load whole)
        sliced = path is not None and not (path / "transformer_2").is_dir()
        self.policy = EditPolicy.from_config(policy_config, corpus, root=root, device=device, seed=seed, sliced=sliced)
        self.config, self.fps = policy_config, fps
        self.fingerprint = policy_fingerprint(policy_config, fps, seed, root,
                                              None if path is not None else self.policy.tokenizer.get_vocab())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``{"item": object (n,) JSON strings}`` -> ``{"shard": object (1,) bytes, "report": object (1,) JSON}``:
        the shard's safetensors bytes (empty when every item failed) and the fingerprint with
        each item's outcome (``problem`` None or one line)."""
        from safetensors.torch import save

        tensors, done = {}, []
        for text in batch["item"]:
            item = json.loads(text)
            try:
                tensors.update(self._encode(item))
                done.append({**item, "problem": None})
            except (ValueError, OSError) as exc:  # VideoDecodeError is a ValueError
                done.append({**item, "problem": " ".join(str(exc).split()) or type(exc).__name__})
        report = json.dumps({"fingerprint": self.fingerprint, "items": done})
        return {"shard": np.array([save(tensors) if tensors else b""], dtype=object), "report": np.array([report], dtype=object)}

    def _encode(self, item: dict) -> dict:
        import torch

        from editrl.protocol.dataset import load_clip
        from editrl.protocol.video import encode_mp4

        key = item["key"]
        if item["kind"] == "text":
            embeds = self.policy.encode_text([item["instruction"]]).cpu()
            stored = embeds.to(self.policy.model_dtype)  # the policy's dtype, unless that would round them
            return {f"text/{key}": (stored if torch.equal(stored.float(), embeds) else embeds).contiguous()}
        c = self.config
        frames = load_clip(item["video_path"], c.num_frames, c.height, c.width, fps=self.fps,
                           start_s=item["start_s"], end_s=item["end_s"])
        payload = np.frombuffer(encode_mp4(frames, fps=self.fps), dtype=np.uint8).copy()
        return {f"source/{key}": self.policy.encode_video(frames[None]).cpu().contiguous(),
                f"payload/{key}": torch.from_numpy(payload)}


def work_items(rows) -> tuple[list[dict], list[dict]]:
    """The distinct clips and instructions of ``rows`` (:class:`~editrl.protocol.prompt_table.PromptRow`),
    plus the empty instruction, as items to encode; and each row's keys.

    Returns:
        Items ``{"kind": "source", "key", "video_path", "start_s", "end_s"}`` or ``{"kind":
        "text", "key", "instruction"}`` in order of first use, and per row ``{"prompt_id",
        "source", "text"}``.
    """
    from editrl.rollout_workers.encode_cache import source_key, text_key

    items: dict[str, dict] = {text_key(""): {"kind": "text", "key": text_key(""), "instruction": ""}}
    keys = []
    for row in rows:
        source, text = source_key(row.video_path, row.start_s, row.end_s), text_key(row.instruction)
        items.setdefault(source, {"kind": "source", "key": source, "video_path": row.video_path,
                                  "start_s": row.start_s, "end_s": row.end_s})
        items.setdefault(text, {"kind": "text", "key": text, "instruction": row.instruction})
        keys.append({"prompt_id": row.prompt_id, "source": source, "text": text})
    return list(items.values()), keys


def cmd_data_cache(args: argparse.Namespace) -> int:
    """``editrl data cache TABLE [TABLE ...] --config X --out DIR [--address A] [--batch-size N] [--workers N]``.

    Returns:
        0 when every row was cached; 1 when some could not be (each named on stdout, prefixed by
        its table when there are several, and listed under ``failed`` in ``manifest.json``), or
        with one ``editrl: error:`` line (no manifest written) when the config, a table or the
        encoding itself cannot be used.
    """
    from editrl.cluster.config import load_train_config, parse_overrides, with_resolved_paths
    from editrl.protocol.prompt_table import read_prompt_table
    from editrl.resources import resolve_path

    if args.batch_size < 1 or (args.workers is not None and args.workers < 1):
        return error(f"--batch-size {args.batch_size} and --workers {args.workers}: must be at least 1")
    try:
        config = with_resolved_paths(load_train_config(args.config, parse_overrides(args.set)))
        tables = [read_prompt_table(resolve_path(table)) for table in args.tables]
        corpus = _corpus(config)
    except (ValueError, OSError) as exc:
        return error(one_line(exc))
    if not any(t.rows for t in tables):
        return error(f"prompt tables {', '.join(str(t.path) for t in tables)} have no usable rows")
    items, keys = work_items([row for t in tables for row in t.rows])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # a build that fails leaves no manifest over new shards
    for stale in out.glob("shard-*.safetensors"):
        stale.unlink()
    try:
        fingerprint, outcomes = _encode_all(items, config, corpus, args, out)
    except Exception as exc:  # noqa: BLE001 - Ray raises its own wrappers of whatever the actors raised
        return error(f"encoding failed: {one_line(getattr(exc, 'cause', None) or exc)}")
    manifest = _manifest(tables, keys, outcomes, fingerprint, config, args)
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    for failure in manifest["failed"]:
        where = f"{failure['table']}: " if len(tables) > 1 else ""
        sys.stdout.write(f"{where}{failure['prompt_id'] or 'row ' + str(failure['row'])}: {failure['problem']}\n")
    shards = len({e["shard"] for e in outcomes.values() if e["shard"]})
    sys.stdout.write(f"{out}: {len(manifest['rows'])} of {sum(t.total for t in tables)} rows cached "
                     f"({len(manifest['sources'])} clips, {len(manifest['texts'])} instructions in {shards} shards); "
                     f"{len(manifest['failed'])} rows could not be (manifest.json)\n")
    return 1 if manifest["failed"] else 0


def _corpus(config) -> list[str]:
    """The instructions ``editrl train`` gives a model built in code for its vocabulary (both tables); [] for a checkpoint."""
    if config.policy.checkpoint is not None:
        return []
    from editrl.cluster.train import load_datasets, run_corpus

    return run_corpus(*load_datasets(config))


def _encode_all(items: list[dict], config, corpus: list[str], args: argparse.Namespace, out: Path) -> tuple[dict, dict]:
    """Run the Ray Data pipeline and write the shards; returns the fingerprint and, per item key,
    ``{"shard": name or None, "problem": None or one line}``.

    Raises:
        RuntimeError: the actors report different fingerprints.
    """
    import ray

    from editrl.resources import bundled_root

    placement = config.topology.rollout
    workers = args.workers or placement.workers
    started = _start_ray(args.address, math.ceil(workers * max(placement.cpus, 1.0)))
    try:
        import ray.data

        dataset = ray.data.from_items([{"item": json.dumps(item)} for item in items]).map_batches(
            ShardEncoder, batch_size=args.batch_size, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=placement.cpus,
            num_gpus=placement.gpus or None, resources=placement.resources or None,
            fn_constructor_kwargs=dict(policy_config=config.policy, corpus=corpus, root=str(bundled_root()), seed=config.seed,
                                       fps=config.fps, device="cuda" if placement.gpus else "cpu",
                                       torch_threads=config.rollout.torch_threads))
        fingerprint, outcomes, shards = None, {}, 0
        for row in dataset.iter_rows():
            report = json.loads(row["report"])
            if fingerprint is not None and report["fingerprint"] != fingerprint:
                raise RuntimeError(f"the encoding actors built different policies: {report['fingerprint']} and {fingerprint}")
            fingerprint = report["fingerprint"]
            name = None
            if row["shard"]:
                name, shards = f"shard-{shards:05d}.safetensors", shards + 1
                (out / name).write_bytes(row["shard"])
                logger.info("wrote %s (%d items)", out / name, sum(i["problem"] is None for i in report["items"]))
            for item in report["items"]:
                outcomes[item["key"]] = {**item, "shard": None if item["problem"] else name}
        return fingerprint, outcomes
    finally:
        if started:
            ray.shutdown()


def _start_ray(address: str | None, num_cpus: int) -> bool:
    """Join ``address`` or start a private local Ray (``num_cpus`` scheduling tokens at least), unless
    this process is connected already. Returns whether it connected (and is to shut down)."""
    import ray

    from editrl.cluster.ray_cluster import init_ray
    from editrl.resources import checkout_root

    if ray.is_initialized():
        return False
    root = checkout_root()
    if address:
        init_ray(address, project_root=str(root) if root else None)
    else:
        path = os.pathsep.join(filter(None, [str(root) if root else None, os.environ.get("PYTHONPATH")]))
        env = {"env_vars": {"PYTHONPATH": path}}
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_cpus), include_dashboard=False, runtime_env=env)
    return True


def _manifest(tables, keys: list[dict], outcomes: dict, fingerprint: dict, config, args: argparse.Namespace) -> dict:
    """The manifest: fingerprint, the shard of every encoded key, the keys of each cached row and
    the failed rows (each with its table and its index in it)."""
    from editrl.rollout_workers.encode_cache import FORMAT

    sources = {k: {"shard": o["shard"], "video_path": o["video_path"], "start_s": o["start_s"], "end_s": o["end_s"]}
               for k, o in outcomes.items() if o["kind"] == "source" and o["shard"]}
    texts = {k: {"shard": o["shard"], "instruction": o["instruction"]} for k, o in outcomes.items()
             if o["kind"] == "text" and o["shard"]}
    rows, failed, row_keys = [], [], iter(keys)
    for contents in tables:
        table, problems = str(contents.path), {p.index: p for p in contents.problems}
        valid = iter(contents.rows)
        for index in range(contents.total):
            if index in problems:
                failed.append({"table": table, "row": index, "prompt_id": problems[index].prompt_id, "video_path": None,
                               "problem": problems[index].problem})
                continue
            row, key = next(valid), next(row_keys)
            problem = outcomes[key["source"]]["problem"] or outcomes[key["text"]]["problem"]
            if problem:
                failed.append({"table": table, "row": index, "prompt_id": row.prompt_id, "video_path": row.video_path,
                               "problem": problem})
            else:
                rows.append({"table": table, "row": index, **key})
    return {"format": FORMAT, "fingerprint": fingerprint, "tables": [str(t.path) for t in tables], "config": str(args.config),
            "device": "cuda" if config.topology.rollout.gpus else "cpu",
            "sources": sources, "texts": texts, "rows": rows, "failed": failed}
