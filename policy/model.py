"""Building, loading and saving the policy's diffusers/transformers components.

The layout on disk is the diffusers one used by Wan2.1 checkpoints::

    <dir>/transformer/   WanTransformer3DModel
    <dir>/vae/           AutoencoderKLWan
    <dir>/text_encoder/  UMT5EncoderModel
    <dir>/tokenizer/     any tokenizer AutoTokenizer reads
    <dir>/scheduler/     FlowMatchEulerDiscreteScheduler
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from policy.config import TinyModelConfig

logger = logging.getLogger(__name__)

PAD, UNK = "<pad>", "<unk>"


@dataclass
class PolicyComponents:
    """The networks of a video-editing policy."""

    transformer: WanTransformer3DModel
    vae: AutoencoderKLWan
    text_encoder: UMT5EncoderModel
    tokenizer: PreTrainedTokenizerFast
    scheduler: FlowMatchEulerDiscreteScheduler


def build_word_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    """Train a lower-cased word-level tokenizer on ``corpus`` (offline, milliseconds).

    Unknown words map to ``<unk>``; ``<pad>`` has id 0 like UMT5's.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    words = sorted({w for text in corpus for w, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text.lower())})
    vocab = {PAD: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(words)}}
    tokenizer.model = models.WordLevel(vocab=vocab, unk_token=UNK)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, unk_token=UNK)


def build_tiny_components(config: TinyModelConfig, corpus: list[str], shift: float = 3.0, seed: int = 0) -> PolicyComponents:
    """Build a small Wan-architecture policy with random weights, for CPU runs and tests.

    Args:
        config: model sizes.
        corpus: texts the word tokenizer is trained on (the instructions).
        shift: flow shift of the scheduler's sigma schedule.
        seed: torch seed for the random initialisation.
    """
    torch.manual_seed(seed)
    c = config.latent_channels
    num_down = len(config.vae_dim_mult) - 1
    if len(config.vae_temporal_downsample) != num_down:
        raise ValueError("vae_temporal_downsample needs one entry per downsampling (len(vae_dim_mult) - 1)")
    vae = AutoencoderKLWan(
        base_dim=config.vae_base_dim,
        z_dim=c,
        dim_mult=config.vae_dim_mult,
        num_res_blocks=1,
        temperal_downsample=config.vae_temporal_downsample,
        latents_mean=[0.0] * c,
        latents_std=[1.0] * c,
        scale_factor_temporal=2 ** sum(config.vae_temporal_downsample),
        scale_factor_spatial=2**num_down,
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=config.dit_heads,
        attention_head_dim=config.dit_head_dim,
        in_channels=2 * c,
        out_channels=c,
        text_dim=config.text_dim,
        freq_dim=64,
        ffn_dim=config.dit_ffn_dim,
        num_layers=config.dit_layers,
        rope_max_seq_len=64,
    )
    tokenizer = build_word_tokenizer(corpus)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=config.text_dim,
            d_kv=config.text_dim // 2,
            d_ff=2 * config.text_dim,
            num_layers=config.text_layers,
            num_heads=2,
            pad_token_id=0,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    return PolicyComponents(transformer, vae, text_encoder, tokenizer, scheduler)


def widen_for_source_conditioning(transformer: WanTransformer3DModel, latent_channels: int) -> WanTransformer3DModel:
    """Make a text-to-video transformer accept ``[noisy latent, source latent]``.

    The patch embedding gets ``latent_channels`` extra input channels whose
    weights are zero, so the model's output is unchanged at step 0 whatever the
    source latent is.

    Raises:
        ValueError: the transformer's in_channels is neither C nor 2C.
    """
    in_channels = transformer.config.in_channels
    if in_channels == 2 * latent_channels:
        return transformer
    if in_channels != latent_channels:
        raise ValueError(f"transformer in_channels={in_channels}, expected {latent_channels} or {2 * latent_channels}")
    old = transformer.patch_embedding
    new = torch.nn.Conv3d(2 * in_channels, old.out_channels, old.kernel_size, old.stride, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :in_channels] = old.weight
        new.bias.copy_(old.bias)
    transformer.patch_embedding = new
    transformer.register_to_config(in_channels=2 * in_channels)
    logger.info("widened the patch embedding from %d to %d input channels (zero-initialised)", in_channels, 2 * in_channels)
    return transformer


def load_components(path: str | Path) -> PolicyComponents:
    """Load a diffusers-format Wan model directory from local disk (no network).

    Raises:
        FileNotFoundError: the directory or one of its five subfolders is missing.
    """
    path = Path(path)
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"checkpoint {path} has no {sub}/ folder")
    vae = AutoencoderKLWan.from_pretrained(path / "vae", local_files_only=True)
    transformer = WanTransformer3DModel.from_pretrained(path / "transformer", local_files_only=True)
    transformer = widen_for_source_conditioning(transformer, vae.config.z_dim)
    text_encoder = UMT5EncoderModel.from_pretrained(path / "text_encoder", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    logger.info("loaded checkpoint %s", path)
    return PolicyComponents(transformer, vae, text_encoder, tokenizer, scheduler)


def save_components(components: PolicyComponents, path: str | Path) -> None:
    """Save all components in the diffusers layout that :func:`load_components` reads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    components.transformer.save_pretrained(path / "transformer")
    components.vae.save_pretrained(path / "vae")
    components.text_encoder.save_pretrained(path / "text_encoder")
    components.tokenizer.save_pretrained(path / "tokenizer")
    components.scheduler.save_pretrained(path / "scheduler")
    index = {
        "_class_name": "WanPipeline",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", type(components.tokenizer).__name__],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
