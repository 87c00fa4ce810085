"""Supervised warm-up of a small policy before RL (VIVA post-trains a model that
was fine-tuned first): the VAE learns to reconstruct the clips, then the DiT
learns the flow-matching objective on synthesized colour edits.

Flow matching (Lipman et al. 2023; Esser et al. 2024, eq. 1-3) in the project's
convention: ``x_sigma = (1 - sigma) z_target + sigma eps`` and the DiT regresses
the velocity ``eps - z_target``. The edits are of random strength in [0, 1], so
the warmed-up model edits in the right direction but with an unreliable
strength: the room that RL then closes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from editrl.policy.model import PolicyComponents
from editrl.protocol.edits import CHECKABLE_EDIT_TYPES, apply_edit

logger = logging.getLogger(__name__)


@dataclass
class WarmupExample:
    """One supervised pair: a source clip, an instruction and its edit type."""

    frames: np.ndarray
    """``uint8 (F, H, W, 3)`` source clip."""
    instruction: str
    edit_type: str
    """One of :data:`editrl.protocol.edits.CHECKABLE_EDIT_TYPES`."""


def _to_pixels(frames: np.ndarray) -> torch.Tensor:
    """``float (F, H, W, 3)`` in [0, 1] -> ``(1, 3, F, H, W)`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).float().mul(2.0).sub(1.0).permute(3, 0, 1, 2).unsqueeze(0)


def train_vae(
    components: PolicyComponents, examples: list[WarmupExample], steps: int, batch_size: int, lr: float, seed: int, crop: int = 32
) -> list[float]:
    """Reconstruction training of the VAE on source clips and random edits of them.

    Trains on random ``crop x crop`` pixel windows of whole clips (the VAE is
    convolutional, so it applies to full frames afterwards) to keep each step
    cheap on a CPU. Loss: L1 + MSE on pixels in [-1, 1] plus 1e-6 x the KL of
    the posterior. Returns the loss per step.
    """
    rng = np.random.default_rng(seed)
    vae = components.vae
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in tqdm(range(steps), desc="warm-up VAE", unit="step"):
        batch = []
        for _ in range(batch_size):
            example = examples[rng.integers(len(examples))]
            frames = example.frames.astype(np.float32) / 255.0
            top = rng.integers(frames.shape[1] - crop + 1)
            left = rng.integers(frames.shape[2] - crop + 1)
            frames = frames[:, top : top + crop, left : left + crop]
            if rng.random() < 0.75:
                frames = apply_edit(frames, CHECKABLE_EDIT_TYPES[rng.integers(len(CHECKABLE_EDIT_TYPES))], float(rng.random()))
            batch.append(_to_pixels(frames))
        pixels = torch.cat(batch)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def set_latent_statistics(components: PolicyComponents, examples: list[WarmupExample]) -> None:
    """Store per-channel latent mean/std of the clips in the VAE config (as Wan's
    ``latents_mean``/``latents_std``) so normalised latents have unit scale."""
    latents = torch.cat([components.vae.encode(_to_pixels(e.frames.astype(np.float32) / 255.0)).latent_dist.mode() for e in examples])
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4)).clamp_min(1e-3)
    components.vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())


@torch.no_grad()
def _encode_normalised(components: PolicyComponents, frames: np.ndarray) -> torch.Tensor:
    config = components.vae.config
    mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
    return (components.vae.encode(_to_pixels(frames)).latent_dist.mode() - mean) / std


@torch.no_grad()
def _encode_text(components: PolicyComponents, texts: list[str], max_tokens: int) -> torch.Tensor:
    tokens = components.tokenizer(texts, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
    hidden = components.text_encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
    return hidden * tokens.attention_mask.unsqueeze(-1)


def train_dit(
    components: PolicyComponents,
    examples: list[WarmupExample],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    max_text_tokens: int,
    strengths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0),
    null_text_prob: float = 0.1,
) -> list[float]:
    """Flow-matching training of the source-conditioned DiT on edits of random strength.

    Targets are precomputed latents of each example edited at every strength in
    ``strengths``; each training sample draws one strength uniformly, sigma from
    a logit-normal (SD3), and drops the instruction with ``null_text_prob`` so
    classifier-free guidance has an unconditional branch. Returns the loss per step.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    sources, targets = [], []
    for example in tqdm(examples, desc="warm-up latents", unit="clip"):
        frames = example.frames.astype(np.float32) / 255.0
        sources.append(_encode_normalised(components, frames))
        targets.append(torch.cat([_encode_normalised(components, apply_edit(frames, example.edit_type, s)) for s in strengths]))
    text = _encode_text(components, [e.instruction for e in examples], max_text_tokens)
    null = _encode_text(components, [""], max_text_tokens)
    dit = components.transformer
    dit.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=1e-4)
    num_train_timesteps = components.scheduler.config.num_train_timesteps
    losses = []
    for _ in tqdm(range(steps), desc="warm-up DiT", unit="step"):
        idx = rng.integers(len(examples), size=batch_size)
        strength_idx = rng.integers(len(strengths), size=batch_size)
        z_source = torch.cat([sources[i] for i in idx])
        z_target = torch.stack([targets[i][j] for i, j in zip(idx, strength_idx)])
        sigma = torch.sigmoid(torch.randn(batch_size)).view(-1, 1, 1, 1, 1)
        noise = torch.randn_like(z_target)
        x = (1.0 - sigma) * z_target + sigma * noise
        cond = torch.stack([null[0] if rng.random() < null_text_prob else text[i] for i in idx])
        pred = dit(torch.cat([x, z_source], dim=1), sigma.flatten() * num_train_timesteps, cond, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise - z_target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    dit.eval().requires_grad_(False)
    return losses
