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
``model_index.json``) is refused: only ``transformer/`` would be loaded, and the low-noise
expert silently replaced by the high-noise one.
"""
from __future__ import annotations

import json
from pathlib import Path

from editrl.policy.config import PolicyConfig

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
        CheckpointKindError: a two-expert checkpoint; a transformer class the kind cannot load;
            ``in_channels`` that is neither ``z_dim`` nor ``2 z_dim`` (``concat``) or not
            ``z_dim`` (``t2v``); ``lora.patch_embedding`` false for a widened ``concat`` model.
    """
    name = f"policy.checkpoint={policy.checkpoint}"
    index = _config(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    if (path / "transformer_2").is_dir() or index.get("transformer_2") or index.get("boundary_ratio") is not None:
        raise CheckpointKindError(
            f"{name}: a two-expert checkpoint (transformer_2/, boundary_ratio {index.get('boundary_ratio')}, Wan2.2 A14B); "
            "editrl loads one DiT and would ignore the low-noise expert - use a single-expert checkpoint (Wan2.1, Wan2.2 TI2V-5B)")
    transformer = _config(path / "transformer" / "config.json")
    z_dim = _config(path / "vae" / "config.json").get("z_dim")
    saved_class, wanted_class = transformer.get("_class_name"), CLASS_OF_KIND[policy.kind]
    if saved_class != wanted_class:
        raise CheckpointKindError(f"{name}: policy.kind={policy.kind!r} loads a {wanted_class}, the checkpoint's transformer is "
                                  f"a {saved_class} (use kind 'vace' for a VACE checkpoint, 'concat' or 't2v' otherwise)")
    channels = transformer.get("in_channels")
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
