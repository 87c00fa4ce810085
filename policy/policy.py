"""The editing policy: a source-conditioned Wan DiT with a LoRA adapter.

Conditioning (VIVA-style): the noisy latent and the source video's latent are
concatenated on the channel axis; the instruction enters through the DiT's
cross-attention. Classifier-free guidance drops the instruction only (the
unconditional branch still sees the source video).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from policy.config import PolicyConfig
from policy.model import PolicyComponents, build_tiny_components, load_components

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"


class AdapterMismatchError(RuntimeError):
    """Adapter weights that do not fit the policy's LoRA modules."""


def lora_target_regex(names: list[str]) -> str:
    """Regex that peft matches (fully) against module names: the given projections in
    every self-attention (attn1) and cross-attention (attn2) block."""
    alternatives = "|".join(n.replace(".", r"\.") for n in names)
    return rf".*blocks\.\d+\.attn[12]\.({alternatives})"


class EditPolicy:
    """Source-conditioned DiT + LoRA, with text/video encoders and the sigma schedule.

    The base weights (DiT, VAE, text encoder) are frozen; only LoRA parameters
    require gradients.
    """

    def __init__(self, components: PolicyComponents, config: PolicyConfig, device: str = "cpu"):
        self.config = config
        self.device = torch.device(device)
        self.transformer = components.transformer.to(self.device)
        self.vae = components.vae.to(self.device)
        self.text_encoder = components.text_encoder.to(self.device)
        self.tokenizer = components.tokenizer
        self.scheduler = components.scheduler
        for module in (self.transformer, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        lora = config.lora
        self.transformer.add_adapter(
            LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                init_lora_weights=lora.init if lora.init == "gaussian" else True,
                target_modules=lora_target_regex(lora.target_modules),
            ),
            adapter_name=ADAPTER_NAME,
        )
        self.num_lora_modules = sum(1 for name, _ in self.transformer.named_modules() if name.endswith(".lora_A"))
        if self.num_lora_modules == 0:
            raise AdapterMismatchError(f"LoRA attached to no module (targets {lora.target_modules})")
        logger.info("LoRA rank %d attached to %d modules", lora.rank, self.num_lora_modules)
        vae_config = self.vae.config
        self._latents_mean = torch.tensor(vae_config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self._latents_std = torch.tensor(vae_config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @classmethod
    def from_config(cls, config: PolicyConfig, corpus: list[str], root: str | Path = ".", device: str = "cpu", seed: int = 0) -> "EditPolicy":
        """Load ``config.checkpoint`` (relative to ``root``) or build the tiny model in code."""
        if config.checkpoint is None:
            components = build_tiny_components(config.tiny, corpus, shift=config.shift, seed=seed)
        else:
            path = Path(config.checkpoint)
            components = load_components(path if path.is_absolute() else Path(root) / path)
        return cls(components, config, device=device)

    # ---- schedule -------------------------------------------------------
    def sigmas(self) -> list[float]:
        """The scheduler's shifted schedule ``sigma_0 = 1 > ... > sigma_T = 0`` (T + 1 floats)."""
        self.scheduler.set_timesteps(self.config.num_steps)
        return [float(s) for s in self.scheduler.sigmas]

    def sde_steps(self) -> list[bool]:
        """For each of the T steps, whether it is stochastic and trained (the first
        ``int(sde_fraction * T)`` steps; at least one)."""
        num = max(1, int(self.config.sde_fraction * self.config.num_steps))
        return [i < num for i in range(self.config.num_steps)]

    # ---- encoders -------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, instructions: list[str]) -> torch.Tensor:
        """Instruction embeddings ``(B, L, D)`` fp32, zero beyond each text's length
        (as Wan's pipeline does); ``""`` gives all zeros (the CFG null condition)."""
        tokens = self.tokenizer(
            instructions, padding="max_length", truncation=True, max_length=self.config.max_text_tokens, return_tensors="pt"
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return (hidden * mask.unsqueeze(-1)).float()

    @torch.no_grad()
    def encode_video(self, frames: np.ndarray) -> torch.Tensor:
        """Normalised VAE latents of videos.

        Args:
            frames: ``uint8`` ``(B, F, H, W, 3)``.

        Returns:
            ``(B, C, f, h, w)`` fp32, ``(z - latents_mean) / latents_std``.
        """
        pixels = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).float() / 127.5 - 1.0
        pixels = pixels.permute(0, 4, 1, 2, 3)
        latents = self.vae.encode(pixels).latent_dist.mode().float()
        return (latents - self._latents_mean.to(latents)) / self._latents_std.to(latents)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Decode normalised latents ``(B, C, f, h, w)`` to ``uint8`` frames ``(B, F, H, W, 3)``."""
        z = latents.float() * self._latents_std.to(latents.device) + self._latents_mean.to(latents.device)
        pixels = self.vae.decode(z).sample.clamp(-1.0, 1.0)
        frames = ((pixels + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
        return frames.cpu().numpy()

    # ---- the network ----------------------------------------------------
    def velocity(
        self,
        x: torch.Tensor,
        sigma: float,
        source_latents: torch.Tensor,
        text_embeds: torch.Tensor,
        null_embeds: torch.Tensor,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Guided velocity ``v = v_null + w (v_text - v_null)`` at noise level ``sigma``.

        Both branches run in one batched forward; gradients flow through both.

        Args:
            x: ``(B, C, f, h, w)`` noisy latents.
            sigma: noise level in [0, 1]; the DiT sees timestep ``1000 * sigma``.
            source_latents: ``(B, C, f, h, w)`` source-video latents.
            text_embeds, null_embeds: ``(B, L, D)`` instruction and empty-instruction embeddings.
            guidance_scale: w; 1.0 skips the null branch.

        Returns:
            ``(B, C, f, h, w)`` fp32.
        """
        model_dtype = self.transformer.dtype
        hidden = torch.cat([x, source_latents], dim=1)
        timestep_value = sigma * self.scheduler.config.num_train_timesteps
        if guidance_scale == 1.0:
            timestep = torch.full((x.shape[0],), timestep_value, device=x.device)
            return self.transformer(hidden.to(model_dtype), timestep, text_embeds.to(model_dtype), return_dict=False)[0].float()
        hidden2 = torch.cat([hidden, hidden], dim=0).to(model_dtype)
        text2 = torch.cat([text_embeds, null_embeds], dim=0).to(model_dtype)
        timestep = torch.full((hidden2.shape[0],), timestep_value, device=x.device)
        out = self.transformer(hidden2, timestep, text2, return_dict=False)[0].float()
        v_text, v_null = out.chunk(2, dim=0)
        return v_null + guidance_scale * (v_text - v_null)

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
        """The adapter's weights in peft's key format, as contiguous CPU fp32 copies."""
        state = get_peft_model_state_dict(self.transformer, adapter_name=ADAPTER_NAME)
        return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}

    def load_adapter_state(self, state: dict[str, torch.Tensor], checksum: str | None = None) -> None:
        """Load adapter weights produced by :meth:`adapter_state`.

        Raises:
            AdapterMismatchError: the keys do not cover exactly this policy's LoRA
                modules, or ``checksum`` does not match the weights.
        """
        if checksum is not None and adapter_checksum(state) != checksum:
            raise AdapterMismatchError("adapter checksum mismatch")
        expected = set(get_peft_model_state_dict(self.transformer, adapter_name=ADAPTER_NAME))
        if set(state) != expected:
            missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
            raise AdapterMismatchError(f"adapter keys differ: missing {missing}, unexpected {extra}")
        result = set_peft_model_state_dict(self.transformer, state, adapter_name=ADAPTER_NAME)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise AdapterMismatchError(f"adapter keys not loaded: {unexpected[:3]}")
        modules = {k.rsplit(".lora_", 1)[0] for k in state}
        if len(modules) != self.num_lora_modules:
            raise AdapterMismatchError(f"adapter covers {len(modules)} modules, policy has {self.num_lora_modules}")


def adapter_checksum(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the adapter's keys and raw fp32 bytes (order-independent)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()
