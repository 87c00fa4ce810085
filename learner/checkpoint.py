"""Atomic checkpoints of the learner (and of the driver state that goes with it).

Layout of a run directory::

    checkpoints/step_000010/   adapter_model.safetensors  (LoRA weights, peft keys)
                               learner.pt                 (optimizer, RNG, policy version; tensors and
                                                          plain containers only, loaded with weights_only=True)
                               driver.json                (step, data cursor, counters)
                               optimizer_shards/          (``topology.learner.sharding: fsdp`` only: each rank's
                                                          AdamW shard, torch.distributed.checkpoint)
    checkpoints/latest         name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, then
``latest`` is replaced atomically: a crash leaves the previous one intact. A sharded
learner's ranks all call :func:`save_checkpoint` and :func:`load_checkpoint` (the adapter
is gathered, the optimizer shards written and read by every rank into one folder, so the
run directory must be on storage they all see); rank 0 writes the rest and renames.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

logger = logging.getLogger(__name__)


OPTIMIZER_SHARDS = "optimizer_shards"
"""The folder of a sharded learner's optimizer state in a checkpoint."""
SHARDED = {"sharded": OPTIMIZER_SHARDS}
"""``learner.pt``'s ``optimizer`` entry when the state is in :data:`OPTIMIZER_SHARDS`."""


def learner_state(learner) -> dict:
    """Everything of a :class:`editrl.learner.learner.Learner` that an update changes, except
    the adapter weights: optimizer state (a pointer to its shards for a sharded learner),
    the minibatch RNG and the policy version."""
    return {
        "optimizer": SHARDED if learner.sharded else learner.optimizer.state_dict(),
        "generator": learner.generator.get_state(),
        "policy_version": learner.policy_version,
        "torch_rng": torch.get_rng_state(),
    }


def save_checkpoint(run_dir: Path, step: int, learner, driver_state: dict, keep: int = 2) -> Path:
    """Write ``checkpoints/step_<step>`` atomically and point ``latest`` at it.

    Args:
        run_dir: the run directory.
        step: the last completed learner step.
        learner: the :class:`editrl.learner.learner.Learner`.
        driver_state: JSON-serialisable driver state (data cursor, counters).
        keep: how many newest checkpoints to keep.

    Returns:
        The checkpoint folder.
    """
    root = run_dir / "checkpoints"
    final = root / f"step_{step:06d}"
    adapter = learner.policy.adapter_state()  # gathered on every rank of a sharded learner
    if learner.sharded:
        tmp = root / f".tmp-{final.name}"  # one name that every rank knows
        if learner.is_rank_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        state = {"optimizer": get_optimizer_state_dict(learner.policy.transformer, learner.optimizer)}
        dcp.save(state, checkpoint_id=str(tmp / OPTIMIZER_SHARDS))  # returns once every rank's shard is written
        if not learner.is_rank_zero:
            return final
    else:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    save_file(adapter, str(tmp / "adapter_model.safetensors"))
    torch.save(learner_state(learner), tmp / "learner.pt")
    (tmp / "driver.json").write_text(json.dumps({"step": step, **driver_state}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / ".latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, root / "latest")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s written", final)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = run_dir / "checkpoints" / pointer.read_text().strip()
    return path if path.is_dir() else None


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely (it names the file)."""


def load_learner_state(path: Path) -> dict:
    """``learner.pt`` as written by :func:`save_checkpoint`, loaded with ``weights_only=True``:
    tensors, numbers, strings, None and dicts/lists/tuples of them, nothing that runs code
    when unpickled (the optimizer state, the RNG states and the policy version need no more).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file holds other objects (e.g. a tampered or foreign file), is
            not a torch file, or lacks a key of the learner state.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else type(exc).__name__)
        raise CheckpointError(f"refusing to load {path}: it is not a plain learner state (tensors and containers only): "
                              f"{first[:300]}") from None
    missing = [k for k in ("optimizer", "generator", "policy_version", "torch_rng") if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"refusing to load {path}: not a learner state, missing {missing}")
    return state


def load_checkpoint(path: Path, learner) -> dict:
    """Restore the learner from ``path`` and return the driver state saved with it.

    Raises:
        FileNotFoundError: a file of the checkpoint is missing.
        CheckpointError: ``learner.pt`` holds anything but tensors and plain containers, or
            the optimizer state was written with the other ``topology.learner.sharding``.
        policy.policy.AdapterMismatchError: the adapter does not fit the policy.
    """
    learner.policy.load_adapter_state(load_file(str(path / "adapter_model.safetensors")))
    state = load_learner_state(path / "learner.pt")
    saved_sharded = state["optimizer"] == SHARDED
    if saved_sharded != learner.sharded:
        raise CheckpointError(f"{path} holds the optimizer state of a {'sharded' if saved_sharded else 'replicated'} learner; "
                              f"resume with topology.learner.sharding={'fsdp' if saved_sharded else 'replicate'}")
    if learner.sharded:
        optimizer = get_optimizer_state_dict(learner.policy.transformer, learner.optimizer)  # this rank's layout
        shards = {"optimizer": optimizer}
        dcp.load(shards, checkpoint_id=str(path / OPTIMIZER_SHARDS))
        set_optimizer_state_dict(learner.policy.transformer, learner.optimizer, shards["optimizer"])
    else:
        learner.optimizer.load_state_dict(state["optimizer"])
    learner.generator.set_state(state["generator"])
    learner.policy_version = state["policy_version"]
    torch.set_rng_state(state["torch_rng"])
    return json.loads((path / "driver.json").read_text())
