"""Learner configuration."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ALGORITHM_FIELDS = {
    "edit_grpo": ("clip_range", "ratio_norm", "grpo_guard_reweight", "timesteps_per_forward"),
    "diffusion_nft": ("forward_steps", "nft_beta", "nft_reward_scale", "nft_adaptive_weighting"),
    "awm": ("forward_steps", "awm_weighting", "awm_ghuber_power", "awm_advantage_scale"),
}
"""The options that belong to one algorithm family (the rest are shared): setting one to other than
its default for another algorithm is refused, and a saved config records only its own algorithm's."""

KL_COEF_DEFAULTS = {"edit_grpo": 0.004, "diffusion_nft": 1e-4, "awm": 1e-3}
"""``kl_coef`` when it is left out: Flow-GRPO's 0.004 on the Gaussian KL; the public DiffusionNFT
(``train.beta``) and AWM (``train.beta``) implementations' 1e-4 and 1e-3 on the velocity MSE."""


class LearnerConfig(BaseModel):
    """Optimisation settings: the algorithm, its loss's options, and the optimizer."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    algorithm: Literal["edit_grpo", "diffusion_nft", "awm"] = "edit_grpo"
    """The RL algorithm (``docs/algorithms.md``). ``edit_grpo``: the reverse process, a clipped
    surrogate on the per-step log-probs of the stochastic steps (VIVA, Flow-GRPO). ``diffusion_nft``
    (DiffusionNFT) and ``awm`` (Advantage Weighted Matching): the forward process, reward-weighted
    flow matching on freshly noised copies of each sample's final latent; any sampler, ``ode``
    included, and no log-probs."""

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
    kl_coef: float | None = Field(None, ge=0)
    """Coefficient of the regulariser to the reference policy (the adapter off): for ``edit_grpo``
    the exact per-step Gaussian KL (averaged over latent elements, like the log-prob); for the
    forward-process algorithms the velocity MSE ``mean((v_theta - v_ref)^2)``. None: the
    algorithm's default (:data:`KL_COEF_DEFAULTS`); 0 skips the reference forward."""
    forward_steps: int | None = Field(None, ge=1)
    """Forward-process algorithms: schedule steps drawn per sample and update (without
    replacement, with fresh noise each) among those the adapter acts on (``policy.lora.active_steps``);
    the sample is noised to each step's sigma. None: all of them."""
    nft_beta: float = Field(1.0, gt=0)
    """``diffusion_nft``: the guidance strength beta of the implicit policies
    ``v+- = v_old +- beta (v_theta - v_old)`` (paper: 1; 0.1 for its OCR runs)."""
    nft_reward_scale: float = Field(5.0, gt=0)
    """``diffusion_nft``: Z, in units of the advantage's std: the optimality probability is
    ``r = 1/2 + 1/2 clip(A / Z, -1, 1)`` (the public implementation: 5, its advantage clip)."""
    nft_adaptive_weighting: bool = True
    """``diffusion_nft``: the self-normalised clean-latent error ``mean(d^2) / sg(mean|d|)``,
    ``d = x0_hat - x0``, instead of the plain velocity error (the public implementation's)."""
    awm_weighting: Literal["uniform", "ghuber"] = "ghuber"
    """``awm``: weighting ``w(l)`` of each sample's flow-matching error ``l``: ``uniform`` is ``l``
    (the paper's loss); ``ghuber`` is ``(sigma / p) ((l + e)^p - e^p)`` (the public implementation's)."""
    awm_ghuber_power: float = Field(0.25, gt=0, le=1)
    """``awm`` with ``ghuber``: the power p (public implementation: 0.25)."""
    awm_advantage_scale: float = Field(5.0, gt=0)
    """``awm``: advantages are divided by this after ``adv_clip`` (public implementation: 5, so
    they lie in [-1, 1])."""
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

    @model_validator(mode="after")
    def _algorithm_options(self) -> "LearnerConfig":
        # set to something else than its default: a full dump of a config (every field set) reads back
        foreign = [name for name in sorted(self.model_fields_set & self.foreign_fields())
                   if getattr(self, name) != type(self).model_fields[name].default]
        if foreign:
            owners = {name: [a for a, names in ALGORITHM_FIELDS.items() if name in names] for name in foreign}
            raise ValueError("; ".join(f"learner.{name} belongs to {' and '.join(owners[name])}, not to "
                                       f"learner.algorithm={self.algorithm}" for name in foreign))
        if self.kl_coef is None:
            self.kl_coef = KL_COEF_DEFAULTS[self.algorithm]
        return self

    @property
    def forward_process(self) -> bool:
        """True for the forward-process algorithms (they train on the final latent, not the trajectory)."""
        return self.algorithm != "edit_grpo"

    def foreign_fields(self) -> set[str]:
        """The options of the other algorithms, which this config neither uses nor records."""
        own = set(ALGORITHM_FIELDS[self.algorithm])
        return {name for names in ALGORITHM_FIELDS.values() for name in names} - own
