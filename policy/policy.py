"""The editing policy: a source-conditioned Wan DiT with a LoRA adapter.

Conditioning (``PolicyConfig.kind``): ``concat`` (VIVA-style) concatenates the
noisy latent and the source video's latent on the channel axis; ``vace`` gives
the source video to a Wan VACE transformer as its context; ``t2v`` is plain
text-to-video (no source). The instruction enters through the DiT's
cross-attention. Classifier-free guidance drops the instruction only (the
unconditional branch still sees the source video).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch

from editrl.policy.adapter import ADAPTER_NAME, AdapterIndex, PackedAdapter, attach_lora
from editrl.policy.config import PolicyConfig
from editrl.policy.model import (
    PolicyComponents,
    build_tiny_components,
    cast_weights,
    check_kind,
    load_components,
    vae_spatial_factor,
)
from editrl.policy.schedule import stochastic_steps
from editrl.policy.weight_slices import defer_weights, load_weight_slices
from editrl.protocol.rollout import SamplerSpec

logger = logging.getLogger(__name__)

MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class EditPolicy:
    """Source-conditioned DiT + LoRA, with text/video encoders and the sigma schedule.

    The base weights (DiT, VAE, text encoder) are frozen; only LoRA parameters
    require gradients.
    """

    def __init__(self, components: PolicyComponents, config: PolicyConfig, device: str = "cpu", seed: int = 0):
        self.config = config
        self.device = torch.device(device)
        self.model_dtype = MODEL_DTYPES[config.dtype]
        check_kind(components.transformer, components.vae_config, config.kind)
        self.weight_files = components.weight_files
        """Where the DiT's weights are still to be read, once sharded (:meth:`read_weight_slices`); None when loaded."""
        if self.weight_files is None:
            # cast where the weights are, then move: never a full-precision copy on the device
            self.transformer = cast_weights(components.transformer, self.model_dtype).to(self.device)
        else:  # placeholders in their dtype; FSDP2 moves each block to the device as it shards it
            self.transformer = components.transformer
        self.vae = components.vae.to(self.device) if components.vae is not None else None
        self.text_encoder = (cast_weights(components.text_encoder, self.model_dtype).to(self.device)
                             if components.text_encoder is not None else None)
        self.tokenizer = components.tokenizer
        self.scheduler = components.scheduler
        self.vae_config = components.vae_config
        for module in (self.transformer, self.vae, self.text_encoder):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        self.adapts_patch_embedding = config.adapts_patch_embedding(components.widened)
        """The adapter includes the patch embedding (the source channels of a widened text-to-video DiT)."""
        self.num_lora_modules = attach_lora(self.transformer, config.lora, seed=seed, patch_embedding=self.adapts_patch_embedding)
        logger.info("LoRA rank %d attached to %d modules%s", config.lora.rank, self.num_lora_modules,
                    " (the patch embedding among them: the source channels were widened from a text-to-video DiT)"
                    if self.adapts_patch_embedding else "")
        self.adapter = AdapterIndex(self.transformer, ADAPTER_NAME, self.num_lora_modules)
        vae_config = self.vae_config
        self._latents_mean = torch.tensor(vae_config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._latents_std = torch.tensor(vae_config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._vace_inactive: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config: PolicyConfig, corpus: list[str], root: str | Path = ".", device: str = "cpu", seed: int = 0,
                    encoders: bool = True, sliced: bool = False) -> "EditPolicy":
        """Load ``config.checkpoint`` (relative to ``root``) or build the tiny model in code.

        A checkpoint's DiT loads directly in ``config.dtype``. ``encoders=False`` is the
        learner's policy: the DiT and scheduler only (instruction embeddings and source
        latents travel with each group), the VAE only for ``vace`` (see
        :class:`editrl.policy.model.PolicyComponents`); :meth:`encode_text`,
        :meth:`encode_video` and :meth:`decode` then raise. ``sliced=True`` (a learner rank that
        shards the DiT with FSDP2) does not read a checkpoint's DiT weights yet: the rank reads
        its slice of them after sharding (:meth:`read_weight_slices`); a model built in code is
        built whole either way. ``seed`` seeds the adapter's initial weights (and a model built in code).
        """
        if config.checkpoint is None:
            components = build_tiny_components(config.tiny, corpus, shift=config.shift, seed=seed, kind=config.kind)
            if not encoders:
                components = components.without_encoders(config.kind)
        else:
            path = Path(config.checkpoint)
            components = load_components(path if path.is_absolute() else Path(root) / path, kind=config.kind,
                                         dtype=MODEL_DTYPES[config.dtype], encoders=encoders, sliced=sliced)
        return cls(components, config, device=device, seed=seed)

    def defer_weights(self) -> bool:
        """Before sharding a policy loaded with ``sliced=True``: make the DiT's placeholder
        weights meta parameters, which FSDP2 shards without allocating them
        (:func:`editrl.policy.weight_slices.defer_weights`). False (nothing done) for a
        policy whose weights are loaded."""
        if self.weight_files is None:
            return False
        defer_weights(self.transformer, self.weight_files)
        return True

    def read_weight_slices(self, rank: int, world_size: int) -> int:
        """After :meth:`defer_weights` and sharding over ``world_size`` ranks: read this rank's
        rows of every DiT weight onto the policy's device
        (:func:`editrl.policy.weight_slices.load_weight_slices`); returns the bytes read.

        Raises:
            RuntimeError: the weights are already loaded.
        """
        if self.weight_files is None:
            raise RuntimeError("the DiT's weights are already loaded")
        read = load_weight_slices(self.transformer, self.weight_files, rank, world_size, self.device)
        self.weight_files = None
        return read

    # ---- schedule -------------------------------------------------------
    def sigmas(self) -> list[float]:
        """The scheduler's shifted schedule ``sigma_0 = 1 > ... > sigma_T = 0`` (T + 1 floats)."""
        self.scheduler.set_timesteps(self.config.num_steps)
        return [float(s) for s in self.scheduler.sigmas]

    def sde_steps(self, seed: int = 0, policy_version: int = 0) -> list[bool]:
        """For each of the T steps, whether it is stochastic and trained: the first
        ``int(sde_fraction * T)`` steps (at least one), or the configured SDE window
        inside them (placed by the group's ``seed`` or the ``policy_version``; see
        :func:`editrl.policy.schedule.stochastic_steps`). All False with the ``ode`` sampler."""
        c = self.config
        if c.sampler == "ode":
            return [False] * c.num_steps
        w = c.sde_window
        if w is None:
            return stochastic_steps(c.num_steps, c.sde_fraction)
        return stochastic_steps(c.num_steps, c.sde_fraction, w.size, w.position, w.start, w.stride, w.every, policy_version, seed)

    def sampler_spec(self, seed: int = 0, policy_version: int = 0, deterministic: bool = False) -> SamplerSpec:
        """The configured sampler for one group (:class:`editrl.protocol.rollout.SamplerSpec`):
        rule, eta, CFG scale, this policy's schedule and :meth:`sde_steps`; with
        ``deterministic`` every step is an Euler (ODE) step (evaluation)."""
        c = self.config
        if deterministic:
            return SamplerSpec.build("ode", 0.0, c.guidance_scale, self.sigmas(), [False] * c.num_steps)
        return SamplerSpec.build(c.sampler, c.eta, c.guidance_scale, self.sigmas(), self.sde_steps(seed, policy_version))

    # ---- encoders -------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, instructions: list[str]) -> torch.Tensor:
        """Instruction embeddings ``(B, L, D)`` fp32, zero beyond each text's length
        (as Wan's pipeline does); ``""`` gives all zeros (the CFG null condition)."""
        self._need("text_encoder", "encode instructions")
        tokens = self.tokenizer(
            instructions, padding="max_length", truncation=True, max_length=self.config.max_text_tokens, return_tensors="pt"
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return (hidden * mask.unsqueeze(-1)).float()

    def _need(self, component: str, what: str) -> None:
        """Raise RuntimeError when this policy was loaded without ``component`` (the learner's DiT-only policy)."""
        if getattr(self, component) is None:
            raise RuntimeError(f"cannot {what}: this policy was loaded without its {component.replace('_', ' ')} "
                               "(encoders=False, the learner's DiT-only policy)")

    @torch.no_grad()
    def encode_video(self, frames: np.ndarray) -> torch.Tensor:
        """Normalised VAE latents of videos.

        Args:
            frames: ``uint8`` ``(B, F, H, W, 3)``.

        Returns:
            ``(B, C, f, h, w)`` fp32, ``(z - latents_mean) / latents_std``.
        """
        self._need("vae", "encode videos")
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).float() / 127.5 - 1.0
        pixels = pixels.permute(0, 4, 1, 2, 3)
        latents = self.vae.encode(pixels).latent_dist.mode().float()
        return (latents - self._latents_mean.to(latents)) / self._latents_std.to(latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Decode normalised latents ``(B, C, f, h, w)`` to ``uint8`` frames ``(B, F, H, W, 3)``."""
        self._need("vae", "decode latents")
        z = latents.float() * self._latents_std.to(latents.device) + self._latents_mean.to(latents.device)
        pixels = self.vae.decode(z).sample.clamp(-1.0, 1.0)
        frames = ((pixels + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
        return frames.cpu().numpy()

    # ---- the network ----------------------------------------------------
    def velocity(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        source_latents: torch.Tensor,
        text_embeds: torch.Tensor,
        null_embeds: torch.Tensor,
        guidance_scale: float,
        null_grad: bool = True,
        micro_batch: int | None = None,
    ) -> torch.Tensor:
        """Guided velocity ``v = v_null + w (v_text - v_null)`` at noise level ``sigma``.

        Both branches run in one batched forward; gradients flow through both. With
        ``null_grad=False`` the null branch runs in a second forward without gradient
        (its activations are not kept: half the activation memory of the pair), so the
        gradient is ``w dv_text`` instead of ``w dv_text - (w - 1) dv_null``. The
        source video enters as the policy kind says (channel concat, VACE context,
        or not at all for ``t2v``), identically in both branches.

        Args:
            x: ``(B, C, f, h, w)`` noisy latents.
            sigma: noise level in [0, 1], a float or a ``(B,)`` tensor of per-sample
                levels; the DiT sees timestep ``1000 * sigma``.
            source_latents: ``(B, C, f, h, w)`` source-video latents (unused by ``t2v``).
            text_embeds, null_embeds: ``(B, L, D)`` instruction and empty-instruction embeddings.
            guidance_scale: w; 1.0 skips the null branch.
            null_grad: whether gradients flow through the null branch (see above).
            micro_batch: most rows per transformer forward (``rollout.forward_micro_batch``):
                the 2B rows of both branches (B without guidance) run in consecutive slices of
                this many; None runs them at once. The DiT treats rows independently, so only
                the peak activation memory changes (and float rounding of the batched kernels).

        Returns:
            ``(B, C, f, h, w)`` fp32.

        Raises:
            ValueError: ``micro_batch < 1``.
        """
        if self.weight_files is not None:
            raise RuntimeError("the DiT's weights are not read yet: a sliced load reads them after sharding "
                               "(EditPolicy.read_weight_slices)")
        dtype = self.model_dtype
        scale = self.scheduler.config.num_train_timesteps
        if isinstance(sigma, torch.Tensor):
            timestep = sigma.to(x.device, torch.float32) * scale
        else:
            timestep = torch.full((x.shape[0],), sigma * scale, device=x.device)
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        hidden, extra = self._conditioned_input(x, source_latents)
        hidden = hidden.to(dtype)
        if guidance_scale == 1.0:
            return self._rows_forward(hidden, timestep, text_embeds.to(dtype), extra, micro_batch)
        if not null_grad:
            v_text = self._rows_forward(hidden, timestep, text_embeds.to(dtype), extra, micro_batch)
            with torch.no_grad():
                v_null = self._rows_forward(hidden, timestep, null_embeds.to(dtype), extra, micro_batch)
            return v_null + guidance_scale * (v_text - v_null)
        extra = {key: torch.cat([value, value], dim=0) for key, value in extra.items()}
        text2 = torch.cat([text_embeds, null_embeds], dim=0).to(dtype)
        out = self._rows_forward(torch.cat([hidden, hidden], dim=0), torch.cat([timestep, timestep]), text2, extra, micro_batch)
        v_text, v_null = out.chunk(2, dim=0)
        return v_null + guidance_scale * (v_text - v_null)

    def _rows_forward(self, hidden: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, extra: dict,
                      micro_batch: int | None) -> torch.Tensor:
        """The transformer on ``(N, ...)`` rows, ``micro_batch`` rows per forward; ``(N, C, f, h, w)`` fp32."""
        n = hidden.shape[0]
        size = n if micro_batch is None else min(micro_batch, n)
        outs = []
        for start in range(0, n, size):
            rows = slice(start, start + size)
            chunk_extra = {key: value[rows] for key, value in extra.items()}
            outs.append(self.transformer(hidden[rows], timestep[rows], text[rows], return_dict=False, **chunk_extra)[0].float())
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def tokens_per_sequence(self, latent_size: tuple[int, ...] | torch.Size) -> int:
        """Tokens one sequence of latents of size ``(f, h, w)`` is to the DiT:
        ``(f / p_t) (h / p_h) (w / p_w)`` with its patch size ``(p_t, p_h, p_w)``
        (Wan2.1 at 480p x 81 frames: latents (21, 60, 104), patch (1, 2, 2): 32,760)."""
        pt, ph, pw = self.transformer.config.patch_size
        f, h, w = (int(n) for n in latent_size)
        return (f // pt) * (h // ph) * (w // pw)

    def _conditioned_input(self, x: torch.Tensor, source_latents: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The DiT's hidden states and extra keyword inputs for this policy kind."""
        kind = self.config.kind
        if kind == "concat":
            return torch.cat([x, source_latents.to(x.dtype)], dim=1), {}
        if kind == "t2v":
            return x, {}
        return x, {"control_hidden_states": self.vace_context(source_latents).to(self.model_dtype)}

    def vace_context(self, source_latents: torch.Tensor) -> torch.Tensor:
        """VACE context of a whole-video edit, as ``WanVACEPipeline`` builds it for a
        source video with an all-ones mask: ``[inactive, reactive, mask]`` on the
        channel axis, where ``inactive`` is the normalised latent of an all-zero
        (grey) video, ``reactive`` the source latent and ``mask`` ones of
        ``scale_factor_spatial^2`` channels.

        Args:
            source_latents: ``(B, C, f, h, w)`` fp32 normalised source latents.

        Returns:
            ``(B, 2 C + s^2, f, h, w)`` fp32.
        """
        b, _, f, h, w = source_latents.shape
        if self._vace_inactive is None or self._vace_inactive.shape[2:] != (f, h, w):
            c = self.config
            with torch.no_grad():
                zeros = torch.zeros(1, 3, c.num_frames, c.height, c.width, device=source_latents.device)
                z = self.vae.encode(zeros).latent_dist.mode().float()
            self._vace_inactive = (z - self._latents_mean.to(z)) / self._latents_std.to(z)
            if self._vace_inactive.shape[2:] != (f, h, w):
                raise ValueError(f"source latents {tuple(source_latents.shape)} do not match the configured video size")
        spatial = vae_spatial_factor(self.vae_config)
        mask = source_latents.new_ones(b, spatial * spatial, f, h, w)
        inactive = self._vace_inactive.to(source_latents).expand(b, -1, -1, -1, -1)
        return torch.cat([inactive, source_latents, mask], dim=1)

    # ---- the adapter ----------------------------------------------------
    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable parameters (LoRA A and B matrices of every adapted module)."""
        params = [p for n, p in self.transformer.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        return params

    @contextlib.contextmanager
    def adapter_disabled(self):
        """Run the reference policy: the same network with the LoRA adapter switched off."""
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's weights in peft's key format (keys sorted), as contiguous CPU
        fp32 copies (:meth:`editrl.policy.adapter.AdapterIndex.state`)."""
        return self.adapter.state()

    def pack_adapter(self) -> PackedAdapter:
        """The adapter's weights as one flat CPU fp32 buffer (:meth:`editrl.policy.adapter.AdapterIndex.pack`)."""
        return self.adapter.pack()

    def load_adapter_state(self, state: dict[str, torch.Tensor] | PackedAdapter, checksum: str | None = None) -> None:
        """Verify, then load adapter weights in place (:meth:`editrl.policy.adapter.AdapterIndex.load`).

        Raises:
            AdapterMismatchError: the weights do not fit this policy's adapter.
        """
        self.adapter.load(state, checksum)

    def check_adapter_state(self, state: dict[str, torch.Tensor] | PackedAdapter, checksum: str | None = None) -> tuple[str, ...]:
        """Verify adapter weights without loading them (:meth:`editrl.policy.adapter.AdapterIndex.check`).

        Raises:
            AdapterMismatchError: the weights do not fit this policy's adapter.
        """
        return self.adapter.check(state, checksum)
