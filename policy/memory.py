"""How big a policy's networks are and what autograd keeps for them, without building
them at full size: the sizing core of ``editrl plan``.

* :func:`model_sizes`: parameter counts of the DiT, the text encoder, the VAE and the
  LoRA adapter, from the networks instantiated on the meta device (no memory, exact
  counts for the installed diffusers and transformers).
* :func:`activation_model`: bytes autograd saves per token for a forward and backward
  of the DiT with the policy's adapter, its dtype and kind, measured by counting the
  tensors saved for the backward (``torch.autograd.graph.saved_tensors_hooks``) in
  small probes of the same block structure on the CPU, then extrapolated linearly in
  width and feed-forward width (every saved tensor of a Wan block is tokens x a
  width: attention runs in fused kernels that keep its output and log-sum-exp only).
"""
from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel, WanVACETransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from editrl.policy.adapter import attach_lora, lora_target_regex
from editrl.policy.architectures import published_architecture
from editrl.policy.config import LoraSettings, PolicyConfig
from editrl.policy.geometry import two_expert_boundary
from editrl.policy.model import build_tiny_components, cast_weights
from editrl.resources import resolve_path

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Architecture:
    """The ``config.json`` contents of a policy's networks and where they came from."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any] | None
    source: str
    experts: int = 1
    """DiTs of this architecture: 2 for Wan2.2 A14B (``transformer/`` and ``transformer_2/``, same config)."""


def _read_config(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def architecture(policy: PolicyConfig, root: str | Path = ".") -> Architecture:
    """The architecture ``policy`` names: its checkpoint's config files, a published
    architecture (:mod:`editrl.policy.architectures`) when the checkpoint is not on this
    machine, or the tiny model's configs when ``policy.checkpoint`` is None.

    Raises:
        FileNotFoundError: the checkpoint is neither on disk nor a published architecture.
    """
    if policy.checkpoint is None:
        with torch.device("meta"):
            parts = build_tiny_components(policy.tiny, ["a"], kind=policy.kind)
        return Architecture({"_class_name": type(parts.transformer).__name__, **parts.transformer.config},
                            dict(parts.vae.config), parts.text_encoder.config.to_dict(), "the tiny model built in code")
    path = resolve_path(policy.checkpoint, root)
    if path.is_dir():
        text = path / "text_encoder" / "config.json"
        experts = 1 if two_expert_boundary(path) is None else 2
        return Architecture(_read_config(path / "transformer" / "config.json"), _read_config(path / "vae" / "config.json"),
                            _read_config(text) if text.is_file() else None, f"the config files in {path}", experts)
    published = published_architecture(policy.checkpoint)
    if published is None:
        raise FileNotFoundError(f"policy.checkpoint: {path} does not exist and is not a published architecture "
                                "(editrl.policy.architectures.PUBLISHED)")
    return Architecture(published["transformer"], published["vae"], published["text_encoder"],
                        f"the published configs of {path.name} (not on this machine)",
                        2 if "boundary_ratio" in published.get("model_index", {}) else 1)


def _config_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _transformer_class(config: dict[str, Any]):
    return WanVACETransformer3DModel if config.get("_class_name") == "WanVACETransformer3DModel" else WanTransformer3DModel


def build_transformer(config: dict[str, Any], kind: str, latent_channels: int) -> torch.nn.Module:
    """The DiT a config describes (on the current default device), with the input
    channels ``concat`` widens a text-to-video checkpoint to."""
    config = _config_kwargs(config)
    if kind == "concat" and config.get("in_channels") == latent_channels:
        config["in_channels"] = 2 * latent_channels
    cls = WanVACETransformer3DModel if "vace_layers" in config else WanTransformer3DModel
    return cls.from_config(config)


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts (numbers of elements) and the DiT's shape."""

    dit: int
    """All DiT parameters."""
    dit_fp32: int
    """Of those, the ones in ``_keep_in_fp32_modules`` (kept fp32 under bf16 weights)."""
    lora: int
    """LoRA A and B elements of the adapter (fp32)."""
    text_encoder: int
    vae: int
    width: int
    """D = heads x head dim."""
    ffn_dim: int
    layers: int
    vace_layers: int
    patch: tuple[int, int, int]
    latent_channels: int
    text_dim: int
    linear_per_block: int
    """Elements of a main block's linear weights (for FLOP counts: 2 x tokens x this per block)."""

    def weight_bytes(self, dtype: str) -> int:
        """Bytes of the DiT's weights in ``dtype`` (fp32-kept modules at 4 bytes)."""
        return (self.dit - self.dit_fp32) * DTYPE_BYTES[dtype] + self.dit_fp32 * 4


def model_sizes(arch: Architecture, lora: LoraSettings, kind: str) -> ModelSizes:
    """Parameter counts of the networks of ``arch`` built on the meta device, and the
    LoRA adapter's size: ``rank x (in + out)`` for every adapted linear layer, plus
    ``rank x (in x kernel + out)`` for an adapted patch embedding (a widened ``concat`` DiT);
    the DiT's weights and the adapter count once per expert (:attr:`Architecture.experts`)."""
    c = arch.vae["z_dim"]
    with torch.device("meta"):
        dit = build_transformer(arch.transformer, kind, c)
        vae = AutoencoderKLWan.from_config(_config_kwargs(arch.vae))
        text = UMT5EncoderModel(UMT5Config(**_config_kwargs(arch.text_encoder))) if arch.text_encoder else None
    keep = set(getattr(dit, "_keep_in_fp32_modules", None) or [])
    pattern = re.compile(lora_target_regex(lora.target_modules, tuple(lora.attention)))
    adapted = [m for name, m in dit.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(name)]
    adapter = sum(lora.rank * (m.in_features + m.out_features) for m in adapted)
    widened = kind == "concat" and arch.transformer.get("in_channels") == c
    if (widened if lora.patch_embedding is None else lora.patch_embedding):  # Conv3d LoRA: A (in x kernel -> r), B (r -> out)
        conv = dit.patch_embedding
        adapter += lora.rank * (conv.in_channels * math.prod(conv.kernel_size) + conv.out_channels)
    block = dit.blocks[0]
    cfg = dit.config
    n = arch.experts  # every expert has the DiT's weights and its own adapter
    return ModelSizes(
        dit=n * sum(p.numel() for p in dit.parameters()),
        dit_fp32=n * sum(p.numel() for n_, p in dit.named_parameters() if keep & set(n_.split("."))),
        lora=n * adapter,
        text_encoder=sum(p.numel() for p in text.parameters()) if text is not None else 0,
        vae=sum(p.numel() for p in vae.parameters()),
        width=cfg.num_attention_heads * cfg.attention_head_dim, ffn_dim=cfg.ffn_dim, layers=cfg.num_layers,
        vace_layers=len(getattr(cfg, "vace_layers", None) or []), patch=tuple(cfg.patch_size), latent_channels=c,
        text_dim=cfg.text_dim,
        linear_per_block=sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear)),
    )


@dataclass(frozen=True)
class LinearBytes:
    """``tokens x (per_width x D + per_ffn x F + per_token) + per_width_fixed x D + fixed`` bytes."""

    per_width: float
    per_ffn: float
    per_token: float
    per_width_fixed: float
    fixed: float

    def at(self, tokens: int, width: int, ffn_dim: int) -> float:
        return tokens * (self.per_width * width + self.per_ffn * ffn_dim + self.per_token) + self.per_width_fixed * width + self.fixed


@dataclass(frozen=True)
class ActivationModel:
    """Bytes autograd saves for one sequence: per main block, per VACE block, and outside the blocks."""

    block: LinearBytes
    vace_block: LinearBytes
    outer: LinearBytes
    hidden_bytes: int
    """Bytes per element of the hidden states between blocks (the weights' dtype)."""

    def forward_bytes(self, sizes: ModelSizes, tokens: int) -> float:
        """Bytes one sequence's forward saves for the backward without checkpointing."""
        return (sizes.layers * self.block.at(tokens, sizes.width, sizes.ffn_dim)
                + sizes.vace_layers * self.vace_block.at(tokens, sizes.width, sizes.ffn_dim)
                + self.outer.at(tokens, sizes.width, sizes.ffn_dim))

    def peak_bytes(self, sizes: ModelSizes, tokens: int, checkpointing: bool) -> float:
        """Bytes one sequence holds at its peak, at the start of the backward: what the forward
        saved plus one block's worth of gradients in flight; with per-block checkpointing each
        block keeps only its input (tokens x D) and the block being recomputed holds its saved
        tensors and their gradients. The one-block term is what ``tests/test_plan.py`` measured
        against a learner process's peak RSS."""
        block = max(self.block.at(tokens, sizes.width, sizes.ffn_dim), self.vace_block.at(tokens, sizes.width, sizes.ffn_dim))
        if not checkpointing:
            return self.forward_bytes(sizes, tokens) + block
        kept = (sizes.layers + sizes.vace_layers) * tokens * sizes.width * self.hidden_bytes
        return kept + self.outer.at(tokens, sizes.width, sizes.ffn_dim) + 2 * block


def _saved_bytes(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves in one forward (parameters excluded)."""
    params = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs, return_dict=False)
    return sum(seen.values())


def _probe(arch: Architecture, lora: LoraSettings, dtype: str, kind: str, text_tokens: int, heads: int, ffn_dim: int,
           layers: int, vace_layers: list[int] | None, frames: int) -> float:
    """Saved bytes per sequence of a small model shaped like ``arch`` (one forward of a CFG pair)."""
    config = copy.deepcopy(arch.transformer)
    config.update(num_attention_heads=heads, ffn_dim=ffn_dim, num_layers=layers)
    if vace_layers is not None:
        config["vace_layers"] = vace_layers
    c = arch.vae["z_dim"]
    torch.manual_seed(0)
    model = build_transformer(config, kind, c)
    model_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    cast_weights(model, model_dtype)
    model.requires_grad_(False)
    attach_lora(model, lora)
    cfg = model.config
    pt, ph, pw = cfg.patch_size
    batch = 2
    shape = (batch, cfg.in_channels, frames * pt, 4 * ph, 8 * pw)
    inputs = {"hidden_states": torch.randn(shape, dtype=model_dtype), "timestep": torch.full((batch,), 500.0),
              "encoder_hidden_states": torch.randn(batch, text_tokens, cfg.text_dim, dtype=model_dtype)}
    if "vace_layers" in config:
        inputs["control_hidden_states"] = torch.randn(batch, cfg.vace_in_channels, *shape[2:], dtype=model_dtype)
    return _saved_bytes(model, inputs) / batch


def activation_model(arch: Architecture, lora: LoraSettings, dtype: str, kind: str, text_tokens: int) -> ActivationModel:
    """Fit :class:`ActivationModel` to probes of ``arch``'s blocks with 1 and 2 heads, two
    feed-forward widths, 1 and 2 blocks (and 1 and 2 VACE blocks for a VACE model) and
    two token counts (32 and 64 tokens per sequence); the real head width, text width,
    text length, adapter, dtype and kind. About 20 small forwards on the CPU, a few seconds.
    """
    head_dim = arch.transformer["attention_head_dim"]
    is_vace = "vace_layers" in arch.transformer
    ffn = 2 * head_dim

    def per(heads: int, ffn_dim: int, frames: int) -> tuple[float, float, float]:
        one = _probe(arch, lora, dtype, kind, text_tokens, heads, ffn_dim, 1, [0] if is_vace else None, frames)
        two = _probe(arch, lora, dtype, kind, text_tokens, heads, ffn_dim, 2, [0] if is_vace else None, frames)
        vace = (_probe(arch, lora, dtype, kind, text_tokens, heads, ffn_dim, 2, [0, 1], frames) - two) if is_vace else 0.0
        block = two - one
        return block, vace, one - block - vace

    tokens = {frames: frames * 32 for frames in (1, 2)}  # (4 x 8) patches per latent frame
    samples = {(h, f, n): per(h, f, n) for h, f in ((1, ffn), (2, ffn), (1, 2 * ffn)) for n in tokens}

    def fit(index: int) -> LinearBytes:
        def rate(h: int, f: int) -> tuple[float, float]:
            a, b = samples[h, f, 1][index], samples[h, f, 2][index]
            slope = (b - a) / (tokens[2] - tokens[1])
            return slope, a - slope * tokens[1]
        (r11, c11), (r21, c21), (r12, _) = rate(1, ffn), rate(2, ffn), rate(1, 2 * ffn)
        per_width, per_ffn = (r21 - r11) / head_dim, (r12 - r11) / ffn
        per_width_fixed = (c21 - c11) / head_dim
        return LinearBytes(per_width, per_ffn, r11 - per_width * head_dim - per_ffn * ffn,
                           per_width_fixed, c11 - per_width_fixed * head_dim)

    return ActivationModel(block=fit(0), vace_block=fit(1), outer=fit(2), hidden_bytes=DTYPE_BYTES[dtype])
