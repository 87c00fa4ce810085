"""Learner configuration."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class LearnerConfig(BaseModel):
    """Optimisation settings of Edit-GRPO."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    learning_rate: float = Field(1e-4, gt=0)
    """AdamW learning rate (Flow-GRPO: 1e-4)."""
    weight_decay: float = Field(1e-4, ge=0)
    """AdamW weight decay (Flow-GRPO: 1e-4)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Global gradient-norm clip (Flow-GRPO: 1.0)."""
    clip_range: float = Field(1e-3, gt=0)
    """Ratio clip range eps (Flow-GRPO Wan: 1e-3), for log-probs averaged over elements."""
    kl_coef: float = Field(0.004, ge=0)
    """KL coefficient beta on the exact per-step Gaussian KL to the reference policy
    (averaged over latent elements, like the log-prob; Flow-GRPO: 0.004); 0 skips the
    reference forward."""
    adv_eps: float = Field(1e-4, gt=0)
    """Added to the reward std in the advantage denominator."""
    adv_std_scope: Literal["group", "global"] = "group"
    """Normalise advantages by each group's std or by the batch's."""
    adv_clip: float | None = 5.0
    """Bound on |advantage| (Flow-GRPO: 5); None disables."""
    ratio_norm: Literal["none", "grpo_guard"] = "none"
    """Normalise each step's log-ratio before clipping: ``grpo_guard`` is GRPO-Guard's
    RatioNorm ``(log r + b) * std`` (workers then also record the transition means);
    the clip range must be retuned for its scale."""
    grpo_guard_reweight: bool = True
    """With ``ratio_norm = grpo_guard``: divide each step's policy loss by ``-dt`` so
    gradients have one scale across steps (GRPO-Guard's gradient reweighting)."""
    timesteps_per_forward: int = Field(1, ge=1)
    """Trained timesteps of a trajectory stacked into one batched forward (and one
    backward); same loss and gradients as 1 up to float rounding, more memory. 1 keeps
    the sampling batch, so on-policy ratios are exactly 1."""
    micro_batch_samples: int | None = Field(None, ge=1)
    """Samples of a group per forward and backward in the learner (each with both CFG
    branches, so 2 x this many sequences); None is the whole group. The micro-batches'
    losses are weighted by their share of the group, so the accumulated gradient is the
    whole group's (up to float rounding); 1 is the smallest, one sample's CFG pair."""
    cfg_null_grad: bool = True
    """Gradients through CFG's null (empty-instruction) branch. False runs that branch
    without gradient in its own forward: half the activations of a CFG pair, and the
    gradient of the guided velocity becomes ``w dv_text`` instead of
    ``w dv_text - (w - 1) dv_null`` (the null branch no longer learns to move away from
    the edit). Off-policy by a rounding error: the branches no longer share a batch."""
    activation_checkpointing: Literal["auto", "on", "off"] = "auto"
    """Recompute each transformer block's activations in the backward instead of keeping
    them (diffusers' per-block gradient checkpointing): same gradients, about one more
    forward of compute, activation memory of one block instead of all. ``auto`` turns it
    on for sequences of at least ``checkpointing_min_tokens`` tokens."""
    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _yaml_switch(cls, value):
        """YAML 1.1 reads a bare ``on``/``off`` as a boolean: take it as the switch it says."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    checkpointing_min_tokens: int = Field(4096, ge=1)
    """``activation_checkpointing: auto``: tokens per sequence (latent frames x height x
    width over the DiT's patch size) from which blocks are checkpointed. Wan at 480p x 81
    frames has 32,760; the embedded default 120."""
    updates_per_step: int = Field(1, ge=1)
    """Optimizer steps per batch of groups: the groups are split into this many
    minibatches; after the first, ratios move off 1 and clipping acts."""
    fsdp_param_dtype: Literal["float32", "bfloat16"] | None = None
    """``topology.learner.sharding: fsdp``: the dtype every parameter is gathered in for compute
    (FSDP2 mixed precision; the adapter then computes in it too); None keeps each parameter's
    own dtype, as the rollout workers' unsharded model computes (bf16 weights, Wan's fp32
    norms and time embedding, the fp32 adapter). Gradients are always reduced in fp32."""
    collective_timeout_s: float = Field(600.0, gt=0)
    """With ``topology.learner.ranks > 1``: seconds a rank waits in a collective (a peer died or hangs) before it fails."""
    torch_threads: int = Field(2, ge=1)
    """CPU threads of the learner process."""
