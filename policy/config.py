"""Configuration of the policy: which model, its size when built in code, the
video geometry, the sampler and the LoRA adapter."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from editrl.policy.geometry import checkpoint_text_tokens
from editrl.policy.sampler_names import DEFAULT_ETA, SamplerName, num_fraction_steps
from editrl.resources import resolve_path


class TinyModelConfig(BaseModel):
    """Sizes of the Wan-architecture model built in code when no checkpoint is given."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    latent_channels: int = 8
    """VAE latent channels (z_dim); the DiT sees twice this (noisy latent + source latent)."""
    vae_base_dim: int = 16
    """Base channel width of AutoencoderKLWan."""
    vae_dim_mult: list[int] = [1, 2, 2]
    """Channel multipliers per VAE stage; len - 1 spatial 2x downsamplings."""
    vae_temporal_downsample: list[bool] = [False, True]
    """Which VAE downsamplings also halve time (causal: F frames -> 1 + (F - 1) / 2^k)."""
    dit_heads: int = 4
    """Attention heads of the DiT."""
    dit_head_dim: int = 16
    """Per-head width of the DiT."""
    dit_layers: int = 2
    """Transformer blocks of the DiT."""
    dit_ffn_dim: int = 128
    """Hidden width of each block's feed-forward network."""
    text_dim: int = 32
    """Width of the text encoder (UMT5) and of the DiT's text projection input."""
    text_layers: int = 2
    """UMT5 encoder layers."""


class LoraSettings(BaseModel):
    """LoRA adapter on the DiT's self- and cross-attention projections (VIVA section 4)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    rank: int = Field(64, ge=1)
    """LoRA rank r (VIVA: 64; Flow-GRPO Wan: 32)."""
    alpha: float = Field(128.0, gt=0)
    """LoRA alpha; the update is scaled by alpha / rank (VIVA: 128)."""
    init: Literal["gaussian", "default"] = "gaussian"
    """peft init_lora_weights: 'gaussian' draws A ~ N(0, 1/r), B = 0 (VIVA)."""
    target_modules: list[str] = ["to_q", "to_k", "to_v", "to_out.0"]
    """Projection names adapted inside the chosen attention blocks."""
    attention: list[Literal["self", "cross"]] = Field(["self", "cross"], min_length=1)
    """Which attentions get the adapter: self (attn1) and cross (attn2) as in VIVA; cross
    alone keeps a small run's updates to instruction-dependent directions."""
    patch_embedding: bool | None = None
    """Also adapt the DiT's patch embedding (the Conv3d that reads the noisy and the source
    latents of a ``concat`` policy) with a LoRA of the same rank. None: on exactly when the
    policy is ``concat`` from a text-to-video checkpoint, whose input was widened with
    zero-initialised source channels (:func:`editrl.policy.model.widen_for_source_conditioning`):
    attention LoRA alone never reads those channels, so the source would be ignored and RL
    would train an instruction-only text-to-video model. False with such a checkpoint is refused
    for that reason. A LoRA (not the new channels trained in full) because it travels, is
    published, checkpointed and exported with the rest of the adapter, and starts as the
    identity (B = 0), so the widened model's first samples are the text-to-video model's."""
    active_steps: int | None = Field(None, ge=1)
    """The adapter acts on the first ``active_steps`` denoising steps only (the
    high-noise steps, where an edit's global colour and layout are decided); the later
    steps run the base model, like the low-noise expert of Wan 2.2's two-expert
    sampler. Every trained (stochastic) step must lie inside. None: every step. RL
    trains the adapter only through the steps it samples stochastically, so an adapter
    that also acts on the untrained low-noise steps changes them blindly."""


class SdeWindowSettings(BaseModel):
    """Only ``size`` consecutive steps are stochastic and trained, the rest are ODE
    steps (the fast variants of Flow-GRPO, MixGRPO's sliding window)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    size: int = Field(2, ge=1)
    """k, the number of consecutive stochastic steps (within the ``sde_fraction`` steps)."""
    position: Literal["fixed", "random", "scheduled"] = "random"
    """Where the window sits: at ``start`` (fixed); uniformly at random per group,
    drawn from the group's seed (random, Flow-GRPO-Fast); or sliding ``stride`` steps
    later every ``every`` policy versions from ``start`` until the last admissible
    position (scheduled, MixGRPO)."""
    start: int = Field(0, ge=0)
    """First step of a fixed window, or of a scheduled one at policy version 0."""
    stride: int = Field(1, ge=0)
    """Steps a scheduled window moves each time it moves."""
    every: int = Field(1, ge=1)
    """Policy versions between two moves of a scheduled window."""
    shared_initial_noise: bool = True
    """All G samples of a group start from the same initial noise and share the ODE
    steps before the window (computed once); they branch inside the window."""


class PolicyConfig(BaseModel):
    """Everything that defines the policy and how it samples."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    kind: Literal["concat", "vace", "t2v"] = "concat"
    """How the source video conditions the DiT: ``concat`` concatenates its latent with
    the noisy latent on the channel axis (a text-to-video checkpoint is widened with
    zero-initialised input channels); ``vace`` feeds it to a ``WanVACETransformer3DModel``
    as the VACE context (mask all ones); ``t2v`` ignores it (plain text-to-video GRPO,
    the instruction is the prompt)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Weights of the DiT and the text encoder (bf16 is meant for GPUs); the VAE, the
    LoRA parameters, latents and all step math stay fp32."""
    checkpoint: str | None = None
    """Diffusers-format model directory (transformer/, vae/, text_encoder/, tokenizer/,
    scheduler/); relative paths resolve against the project root. None builds the tiny
    model in code with random weights."""
    tiny: TinyModelConfig = TinyModelConfig()
    """Sizes used when ``checkpoint`` is None."""
    height: int = Field(64, ge=8)
    """Frame height in pixels the policy edits at."""
    width: int = Field(64, ge=8)
    """Frame width in pixels."""
    num_frames: int = Field(5, ge=1)
    """Frames per clip (1 + multiple of the VAE's temporal factor)."""
    num_steps: int = Field(10, ge=2)
    """Denoising steps T of the sampling schedule."""
    shift: float = Field(3.0, gt=0)
    """Flow shift of the sigma schedule of a model built in code (Wan: 3.0 at 480p); a
    checkpoint's own scheduler config decides for a loaded model."""
    guidance_scale: float = Field(2.0, ge=1.0)
    """Classifier-free guidance on the instruction only (VIVA: 2.0); 1.0 disables CFG."""
    sampler: SamplerName = "flow_sde"
    """Rule of the stochastic steps: ``flow_sde`` (Flow-GRPO, ``s = eta sqrt(sigma / (1 - sigma))``),
    ``flow_sde_wan`` (the Wan linear level ``s = eta (sigma_T + (sigma_1 - sigma_T) sigma)``),
    ``cps`` (coefficients-preserving sampling) or ``ode`` (no stochastic step: sampling
    only, nothing to train). Non-stochastic steps are always Euler steps."""
    eta: float | None = Field(None, ge=0.0)
    """Noise scale of the sampler; None takes the sampler's default (flow_sde 0.7,
    flow_sde_wan 1.0, cps 0.7); 0 makes sampling deterministic. CPS needs eta <= 1."""
    sde_fraction: float = Field(0.9, gt=0.0, le=1.0)
    """Fraction of the T steps, from the first, that are stochastic and trained; the rest
    are deterministic Euler steps. 0.9 with T = 10 skips the last step, whose tiny std
    makes log-probs explode (Flow-GRPO timestep_fraction 0.99)."""
    sde_window: SdeWindowSettings | None = None
    """Only a window of consecutive steps (inside the ``sde_fraction`` steps) is
    stochastic and trained; None: all ``sde_fraction`` steps are."""
    antithetic: bool = False
    """The G samples of a group come in pairs whose stochastic-step noises are
    negatives of each other (antithetic variates, as in evolution strategies): each
    sample is still drawn from the policy, and a pair's reward difference isolates
    the part of the reward that changes sign with the noise. Needs an even group size."""
    max_text_tokens: int | None = Field(None, ge=4)
    """Instruction tokens kept (padded/truncated) for the text encoder. None follows the model
    (:func:`editrl.policy.geometry.checkpoint_text_tokens`): the checkpoint tokenizer's
    ``model_max_length`` when it sets one, else 512 as Wan's pipelines use; 32 for the tiny
    model built in code. Resolved when the config is read, so a saved config records the number."""
    lora: LoraSettings = LoraSettings()
    """The trained adapter."""

    @model_validator(mode="after")
    def _resolve_and_check(self) -> "PolicyConfig":
        if self.max_text_tokens is None:
            self.max_text_tokens = checkpoint_text_tokens(
                None if self.checkpoint is None else resolve_path(self.checkpoint))
        if self.eta is None:
            self.eta = DEFAULT_ETA[self.sampler]
        if self.sampler == "cps" and self.eta > 1.0:
            raise ValueError(f"cps needs eta <= 1, got {self.eta}")
        window = self.sde_window
        if window is not None:
            eligible = num_fraction_steps(self.num_steps, self.sde_fraction)
            if window.size > eligible or window.start > eligible - window.size:
                raise ValueError(
                    f"sde_window (size {window.size}, start {window.start}) does not fit the {eligible} steps "
                    f"that sde_fraction={self.sde_fraction} leaves of num_steps={self.num_steps}"
                )
        active = self.lora.active_steps
        if active is not None:
            if active > self.num_steps:
                raise ValueError(f"lora.active_steps={active} exceeds num_steps={self.num_steps}")
            last = self.last_trainable_step()
            if last is not None and last >= active:
                raise ValueError(
                    f"lora.active_steps={active}: step {last} can be stochastic and trained (sde_fraction "
                    f"{self.sde_fraction}, sde_window {window.model_dump() if window else None}) but the adapter "
                    f"does not act there; use active_steps >= {last + 1} or move the window earlier"
                )
        return self

    def last_trainable_step(self) -> int | None:
        """The latest denoising step (0-based) that can be stochastic and trained under
        this config: the end of a fixed window, else the last of the ``sde_fraction``
        steps (random and scheduled windows can reach it); None for the ``ode`` sampler."""
        if self.sampler == "ode":
            return None
        window = self.sde_window
        if window is not None and window.position == "fixed":
            return window.start + window.size - 1
        return num_fraction_steps(self.num_steps, self.sde_fraction) - 1

    def adapts_patch_embedding(self, widened: bool) -> bool:
        """Whether the LoRA adapter includes the patch embedding (``lora.patch_embedding``
        resolved for a model whose input was ``widened`` from a text-to-video checkpoint).

        Raises:
            ValueError: ``lora.patch_embedding`` is False for a widened ``concat`` model: the
                adapter would never read the source video.
        """
        choice = self.lora.patch_embedding
        if widened and choice is False:
            raise ValueError(
                "policy.lora.patch_embedding=false with kind 'concat' and a text-to-video checkpoint: its new source "
                "channels are zero and only the patch embedding reads them, so the source video would be ignored and RL "
                "would train an instruction-only text-to-video model; set policy.lora.patch_embedding to true (or null), "
                "use a checkpoint fine-tuned for editing (in_channels twice the VAE's z_dim), or kind 't2v'")
        return widened if choice is None else choice

    def adapter_acts_at(self, step: int) -> bool:
        """Whether the LoRA adapter is applied at denoising step ``step`` (0-based)."""
        return self.lora.active_steps is None or step < self.lora.active_steps
