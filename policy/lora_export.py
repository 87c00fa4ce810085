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

from editrl.policy.experts import TwoExperts
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


SECOND_EXPERT_WEIGHT_NAME = "pytorch_lora_weights_transformer_2.safetensors"
"""The low-noise expert's LoRA file of a two-expert policy (Wan2.2 A14B); diffusers loads it into
``transformer_2`` with ``pipe.load_lora_weights(directory, weight_name=..., load_into_transformer_2=True)``."""


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
    if isinstance(policy.transformer, TwoExperts):  # Wan2.2 A14B: one file per expert
        second = {k.removeprefix("transformer_2."): v for k, v in state.items() if k.startswith("transformer_2.")}
        first = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
        WanPipeline.save_lora_weights(directory, transformer_lora_layers=second, weight_name=SECOND_EXPERT_WEIGHT_NAME)
        logger.info("exported %d LoRA modules of transformer_2 to %s (load_lora_weights(..., load_into_transformer_2=True))",
                    len(second) // 2, directory / SECOND_EXPERT_WEIGHT_NAME)
        state = first
    WanPipeline.save_lora_weights(directory, transformer_lora_layers=state, weight_name=LORA_WEIGHT_NAME)
    logger.info("exported %d LoRA modules to %s", len(state) // 2, directory / LORA_WEIGHT_NAME)
    return directory / LORA_WEIGHT_NAME
