"""Does a checkpoint fit the policy kind? Read from its ``config.json`` files, before any
process starts or torch is imported.

The kinds (``policy.kind``, :class:`editrl.policy.config.PolicyConfig`):

* ``concat`` needs a ``WanTransformer3DModel``. With ``in_channels`` twice the VAE's
  ``z_dim`` it is source-conditioned (fine-tuned for editing) and loads as it is. With
  ``in_channels == z_dim`` it is a text-to-video model: its input is widened with zero
  source channels, which only a LoRA on the patch embedding can read, so
  ``policy.lora.patch_embedding`` must not be false
  (:meth:`~editrl.policy.config.PolicyConfig.adapts_patch_embedding`).
* ``t2v`` needs a ``WanTransformer3DModel`` with ``in_channels == z_dim``.
* ``vace`` needs a ``WanVACETransformer3DModel``.

A two-expert checkpoint (Wan2.2 A14B: ``transformer_2/`` and a ``boundary_ratio`` in
``model_index.json``) loads both experts (:mod:`editrl.policy.experts`): the second must be
of the same class and width as the first, and the kind is not ``vace``. Its learner is not
sharded (no FSDP2 plan or sequence parallelism for two experts yet,
:func:`check_learner_layout`).
"""
from __future__ import annotations

import json
from pathlib import Path

from editrl.policy.config import PolicyConfig
from editrl.policy.geometry import two_expert_boundary

CLASS_OF_KIND = {"concat": "WanTransformer3DModel", "t2v": "WanTransformer3DModel", "vace": "WanVACETransformer3DModel"}
"""The diffusers transformer class each policy kind loads."""


class CheckpointKindError(ValueError):
    """A checkpoint that does not fit ``policy.kind`` (one line naming the checkpoint, the field and the rule)."""


def _config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointKindError(f"{path}: cannot read the model config ({type(exc).__name__}: {exc})") from None


def checkpoint_widened(policy: PolicyConfig, path: Path) -> bool:
    """Check the checkpoint directory ``path`` against ``policy`` and say whether a ``concat``
    policy would widen it (a text-to-video DiT, ``in_channels == z_dim``).

    Args:
        policy: the policy config (``kind``, ``lora.patch_embedding``).
        path: a diffusers model directory (``transformer/``, ``vae/`` ...).

    Returns:
        True when the policy is ``concat`` and the transformer is text-to-video.

    Raises:
        CheckpointKindError: a two-expert checkpoint of kind ``vace``, without a valid ``boundary_ratio``,
            or whose experts differ in class, channels or patch; a transformer class the kind cannot load;
            ``in_channels`` that is neither ``z_dim`` nor ``2 z_dim`` (``concat``) or not
            ``z_dim`` (``t2v``); ``lora.patch_embedding`` false for a widened ``concat`` model.
    """
    name = f"policy.checkpoint={policy.checkpoint}"
    boundary = two_expert_ratio(path)
    if boundary is not None and policy.kind == "vace":
        raise CheckpointKindError(f"{name}: a two-expert checkpoint (transformer_2/, boundary_ratio {boundary}) cannot be kind 'vace'")
    transformer = _config(path / "transformer" / "config.json")
    z_dim = _config(path / "vae" / "config.json").get("z_dim")
    saved_class, wanted_class = transformer.get("_class_name"), CLASS_OF_KIND[policy.kind]
    if saved_class != wanted_class:
        raise CheckpointKindError(f"{name}: policy.kind={policy.kind!r} loads a {wanted_class}, the checkpoint's transformer is "
                                  f"a {saved_class} (use kind 'vace' for a VACE checkpoint, 'concat' or 't2v' otherwise)")
    channels = transformer.get("in_channels")
    if boundary is not None:
        second = _config(path / "transformer_2" / "config.json")
        for key in ("_class_name", "in_channels", "patch_size"):
            if second.get(key) != transformer.get(key):
                raise CheckpointKindError(f"{name}: the experts differ in {key}: transformer/ has {transformer.get(key)}, "
                                          f"transformer_2/ has {second.get(key)}")
    if policy.kind == "vace":
        return False
    if policy.kind == "t2v" and channels != z_dim:
        raise CheckpointKindError(f"{name}: policy.kind='t2v' needs transformer in_channels equal to the VAE's z_dim "
                                  f"{z_dim}, the checkpoint has {channels} (a source-conditioned model: use kind 'concat')")
    if policy.kind == "concat" and channels not in (z_dim, 2 * z_dim if isinstance(z_dim, int) else None):
        raise CheckpointKindError(f"{name}: policy.kind='concat' needs transformer in_channels {z_dim} (text-to-video, "
                                  f"widened) or {2 * z_dim if isinstance(z_dim, int) else '2 z_dim'} (source-conditioned), "
                                  f"the checkpoint has {channels}")
    widened = policy.kind == "concat" and channels == z_dim
    try:
        policy.adapts_patch_embedding(widened)
    except ValueError as exc:
        raise CheckpointKindError(f"{name}: {exc}") from None
    return widened


def two_expert_ratio(path: Path) -> float | None:
    """``boundary_ratio`` of a two-expert checkpoint directory, None for a single-expert one
    (:func:`editrl.policy.geometry.two_expert_boundary`).

    Raises:
        CheckpointKindError: ``transformer_2/`` without a ``boundary_ratio`` in (0, 1), or the reverse.
    """
    try:
        return two_expert_boundary(path)
    except (ValueError, OSError) as exc:
        raise CheckpointKindError(str(exc)) from None


def check_learner_layout(path: Path, sharding: str, sequence_parallel: int) -> None:
    """A two-expert checkpoint's learner must be replicated, without sequence parallelism.

    Raises:
        CheckpointKindError: naming ``topology.learner.sharding`` or ``topology.learner.sequence_parallel``.
    """
    if two_expert_ratio(path) is None:
        return
    if sharding != "replicate":
        raise CheckpointKindError(f"{path}: topology.learner.sharding={sharding} is not supported for a two-expert checkpoint "
                                  "(transformer_2/); use replicate")
    if sequence_parallel != 1:
        raise CheckpointKindError(f"{path}: topology.learner.sequence_parallel={sequence_parallel} is not supported for a "
                                  "two-expert checkpoint (transformer_2/); use 1")
