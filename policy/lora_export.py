"""Export of the trained LoRA adapter in the format diffusers' Wan pipelines load
with ``load_lora_weights``.

The file is ``pytorch_lora_weights.safetensors`` with peft/diffusers keys
``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` (for example
``transformer.blocks.0.attn1.to_q.lora_A.weight``), as written by
``WanPipeline.save_lora_weights``. A file without alpha metadata is loaded by
diffusers with ``alpha = rank`` (scale 1), so the adapter's scale
``alpha / rank`` is folded into ``lora_B``: every loader then applies the same
update ``W + (alpha / rank) B A``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import WanPipeline

from editrl.policy.policy import EditPolicy

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def diffusers_lora_state(state: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """Adapter weights in peft keys (no prefix) with ``lora_B`` scaled by ``alpha / rank``.

    Args:
        state: peft state dict (``<module>.lora_A.weight``, ``<module>.lora_B.weight``), fp32.
        rank, alpha: the adapter's LoRA rank and alpha.

    Returns:
        A new dict, same keys, fp32 contiguous CPU tensors.

    Raises:
        ValueError: a key that is neither a LoRA A nor a LoRA B weight.
    """
    scale = alpha / rank
    out = {}
    for key, value in state.items():
        if ".lora_B." in key:
            value = value * scale
        elif ".lora_A." not in key:
            raise ValueError(f"unexpected adapter key {key!r}")
        out[key] = value.detach().to("cpu", torch.float32).contiguous()
    return out


def export_diffusers_lora(policy: EditPolicy, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the policy's adapter (or ``state``, its weights in peft's key format, already
    gathered) as ``<directory>/pytorch_lora_weights.safetensors``.

    A diffusers ``WanPipeline`` (or ``WanVACEPipeline`` for the ``vace`` kind) built
    from the same base weights loads it with ``pipe.load_lora_weights(directory)``.
    The adapted modules are the attention projections only (the widened patch
    embedding of the ``concat`` kind is base weight, not adapter).

    Returns:
        The path of the written file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora = policy.config.lora
    state = diffusers_lora_state(policy.adapter_state() if state is None else state, lora.rank, lora.alpha)
    WanPipeline.save_lora_weights(directory, transformer_lora_layers=state, weight_name=LORA_WEIGHT_NAME)
    logger.info("exported %d LoRA modules to %s", len(state) // 2, directory / LORA_WEIGHT_NAME)
    return directory / LORA_WEIGHT_NAME
