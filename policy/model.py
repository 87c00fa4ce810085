"""Building, loading and saving the policy's diffusers/transformers components.

The layout on disk is the diffusers one used by Wan2.1 checkpoints::

    <dir>/transformer/   WanTransformer3DModel (or WanVACETransformer3DModel)
    <dir>/vae/           AutoencoderKLWan
    <dir>/text_encoder/  UMT5EncoderModel
    <dir>/tokenizer/     any tokenizer AutoTokenizer reads (Wan: T5TokenizerFast)
    <dir>/scheduler/     FlowMatchEulerDiscreteScheduler, or the UniPCMultistepScheduler
                         with flow sigmas that Wan2.1 ships (only its flow shift is used)
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel, WanVACETransformer3DModel
from diffusers.configuration_utils import FrozenDict
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from editrl.policy.config import TinyModelConfig
from editrl.policy.experts import EXPERT_NAMES, TwoExperts
from editrl.policy.geometry import two_expert_boundary, vae_scale_factors
from editrl.policy.weight_slices import WeightFiles, load_dtype, placeholder_transformer

logger = logging.getLogger(__name__)

PAD, UNK = "<pad>", "<unk>"


@dataclass
class PolicyComponents:
    """The networks of a video-editing policy. A learner loads the DiT alone
    (:func:`load_components` with ``encoders=False``): ``text_encoder`` and
    ``tokenizer`` are then None, and ``vae`` too unless the kind is ``vace``
    (its context needs one VAE encode of a blank video); ``vae_config`` is
    always there (latent channels, factors, normalisation)."""

    transformer: WanTransformer3DModel | WanVACETransformer3DModel
    vae: AutoencoderKLWan | None
    text_encoder: UMT5EncoderModel | None
    tokenizer: PreTrainedTokenizerFast | None
    scheduler: FlowMatchEulerDiscreteScheduler
    vae_config: Mapping[str, Any] | None = None
    """The VAE's config (``vae.config`` when the VAE is loaded; set by ``__post_init__``)."""
    weight_files: WeightFiles | None = None
    """Set when the transformer's parameters are placeholders still to be read, a slice per
    rank, once it is sharded (``load_components(sliced=True)``, :mod:`editrl.policy.weight_slices`)."""
    widened: bool = False
    """The transformer is a text-to-video one whose patch embedding :func:`widen_for_source_conditioning`
    widened with zero source channels (``concat`` from a text-to-video checkpoint)."""

    def __post_init__(self) -> None:
        if self.vae_config is None:
            if self.vae is None:
                raise ValueError("PolicyComponents needs the VAE or its config")
            self.vae_config = self.vae.config

    def without_encoders(self, kind: str) -> "PolicyComponents":
        """The same components without the text encoder, the tokenizer and (but for ``vace``) the VAE."""
        return PolicyComponents(self.transformer, self.vae if kind == "vace" else None, None, None, self.scheduler,
                                self.vae_config, self.weight_files, self.widened)


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


def build_tiny_components(
    config: TinyModelConfig, corpus: list[str], shift: float = 3.0, seed: int = 0, kind: str = "concat"
) -> PolicyComponents:
    """Build a small Wan-architecture policy with random weights, for CPU runs and tests.

    Args:
        config: model sizes.
        corpus: texts the word tokenizer is trained on (the instructions).
        shift: flow shift of the scheduler's sigma schedule.
        seed: torch seed for the random initialisation.
        kind: ``concat`` (DiT input 2C channels), ``t2v`` (C channels) or ``vace``
            (a ``WanVACETransformer3DModel`` with one VACE block at layer 0).

    Raises:
        ValueError: inconsistent VAE sizes or an unknown kind.
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
    dit = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=config.dit_heads,
        attention_head_dim=config.dit_head_dim,
        out_channels=c,
        text_dim=config.text_dim,
        freq_dim=64,
        ffn_dim=config.dit_ffn_dim,
        num_layers=config.dit_layers,
        rope_max_seq_len=64,
    )
    if kind == "concat":
        transformer = WanTransformer3DModel(in_channels=2 * c, **dit)
    elif kind == "t2v":
        transformer = WanTransformer3DModel(in_channels=c, **dit)
    elif kind == "vace":
        spatial = 2**num_down
        transformer = WanVACETransformer3DModel(in_channels=c, vace_layers=[0], vace_in_channels=2 * c + spatial * spatial, **dit)
    else:
        raise ValueError(f"unknown policy kind {kind!r}")
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


def cast_weights(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a model's floating-point weights to ``dtype`` in place, keeping the
    modules the model class lists in ``_keep_in_fp32_modules`` (norms, time
    embedding, ... of Wan's DiT) in fp32, as ``from_pretrained(torch_dtype=...)`` does."""
    if dtype == torch.float32:
        return module
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(load_dtype(module, name, tensor, dtype))
    return module


def release_file_mappings(module: torch.nn.Module) -> int:
    """Copy a loaded model's fp32 tensors into memory of their own.

    ``from_pretrained`` reads safetensors through a memory map; a tensor whose stored dtype
    is its target dtype (the modules kept in fp32 under bf16 weights) stays a view of the
    mapped file and keeps the whole shard mapped, so the process holds the fp32 checkpoint's
    pages beside its bf16 weights (measured: 1.1 GB of file pages beside 0.5 GB of weights).

    Returns:
        The number of tensors copied.
    """
    count = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.dtype == torch.float32:
            tensor.data = tensor.data.clone()
            count += 1
    return count


def vae_spatial_factor(vae_config: Mapping[str, Any]) -> int:
    """Pixels per latent cell along height and width (:func:`editrl.policy.geometry.vae_scale_factors`:
    the config's ``scale_factor_spatial``, 16 for Wan2.2 TI2V-5B's patchifying VAE, else
    ``2 ** len(temperal_downsample)``, 8 for Wan2.1's)."""
    return vae_scale_factors(vae_config)[0]


def check_kind(transformer: torch.nn.Module, vae_config: Mapping[str, Any], kind: str) -> None:
    """Check that a transformer fits a policy kind and the VAE's latent channels C.

    ``concat`` needs a ``WanTransformer3DModel`` with 2C input channels, ``t2v`` one
    with C, ``vace`` a ``WanVACETransformer3DModel`` with C input channels and
    ``2 C + s^2`` VACE channels (s the VAE's spatial factor).

    Raises:
        ValueError: the transformer does not fit.
    """
    c = vae_config["z_dim"]
    in_channels = transformer.config.in_channels
    is_vace = isinstance(transformer, WanVACETransformer3DModel)
    if kind == "vace":
        expected = 2 * c + vae_spatial_factor(vae_config) ** 2
        if not is_vace or in_channels != c or transformer.config.vace_in_channels != expected:
            raise ValueError(f"kind 'vace' needs a WanVACETransformer3DModel with in_channels={c} and vace_in_channels={expected}")
        return
    wanted = {"concat": 2 * c, "t2v": c}.get(kind)
    if wanted is None:
        raise ValueError(f"unknown policy kind {kind!r}")
    if is_vace or in_channels != wanted:
        raise ValueError(f"kind {kind!r} needs a WanTransformer3DModel with in_channels={wanted}, got "
                         f"{type(transformer).__name__} with in_channels={in_channels}")


def load_flow_scheduler(path: Path) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching sigma schedule of a checkpoint's ``scheduler/`` folder.

    A ``FlowMatchEulerDiscreteScheduler`` config loads as is. Wan2.1's diffusers
    checkpoints ship a ``UniPCMultistepScheduler`` with ``use_flow_sigmas``; the
    policy's samplers are its own, so only its ``flow_shift`` and
    ``num_train_timesteps`` are taken, into a FlowMatchEuler schedule with that shift.

    Raises:
        ValueError: any other scheduler class (its sigmas would be silently wrong).
    """
    config = json.loads((path / "scheduler_config.json").read_text())
    name = config.get("_class_name")
    if name == "FlowMatchEulerDiscreteScheduler":
        return FlowMatchEulerDiscreteScheduler.from_pretrained(path, local_files_only=True)
    if name == "UniPCMultistepScheduler" and config.get("use_flow_sigmas"):
        shift = float(config.get("flow_shift", 1.0))
        logger.info("using the flow shift %.2f of the checkpoint's UniPC scheduler for a flow-matching schedule", shift)
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.get("num_train_timesteps", 1000), shift=shift)
    raise ValueError(f"scheduler {name!r} in {path} is not a flow-matching schedule")


def load_components(path: str | Path, kind: str = "concat", dtype: torch.dtype = torch.float32,
                    encoders: bool = True, sliced: bool = False) -> PolicyComponents:
    """Load a diffusers-format Wan model directory from local disk (no network).

    ``kind`` decides the transformer: ``concat`` loads a ``WanTransformer3DModel``
    and widens a text-to-video one for source conditioning
    (:func:`widen_for_source_conditioning`); ``t2v`` loads it as it is; ``vace``
    loads a ``WanVACETransformer3DModel``. The transformer's weights load directly in
    ``dtype`` (``from_pretrained(torch_dtype=...)``, which keeps the modules the class
    lists in ``_keep_in_fp32_modules`` in fp32): never an fp32 copy first. With
    ``encoders=False`` (the learner) the text encoder and tokenizer are not loaded,
    nor the VAE's weights unless ``kind`` is ``vace``; its config is read either way.
    With ``sliced=True`` (a learner that shards the DiT with FSDP2) the transformer's
    weights are not read: its parameters are zero-byte placeholders and
    ``weight_files`` says where each one is, for
    :func:`editrl.policy.weight_slices.load_weight_slices` after sharding.

    A two-expert checkpoint (Wan2.2 A14B: ``transformer_2/`` and ``boundary_ratio`` in
    ``model_index.json``) loads both experts as one :class:`editrl.policy.experts.TwoExperts`
    (each widened for ``concat``), switched at ``boundary_ratio * num_train_timesteps``.

    Raises:
        FileNotFoundError: the directory or one of its five subfolders is missing.
        ValueError: the transformer does not fit the kind (:func:`check_kind`), the
            scheduler is not a flow-matching one, or a two-expert checkpoint is loaded
            ``sliced`` or as ``vace`` or lacks a valid ``boundary_ratio``.
    """
    path = Path(path)
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / sub).is_dir():
            raise FileNotFoundError(f"checkpoint {path} has no {sub}/ folder")
    vae = None
    if encoders or kind == "vace":
        vae = AutoencoderKLWan.from_pretrained(path / "vae", local_files_only=True)
        vae_config = vae.config
    else:
        vae_config = FrozenDict(AutoencoderKLWan.load_config(path / "vae", local_files_only=True))
    transformer_cls = WanVACETransformer3DModel if kind == "vace" else WanTransformer3DModel
    saved_cls = json.loads((path / "transformer" / "config.json").read_text()).get("_class_name")
    if saved_cls != transformer_cls.__name__:
        raise ValueError(f"kind {kind!r} needs a {transformer_cls.__name__} checkpoint, {path} has {saved_cls}")
    weight_files = None
    boundary_ratio = two_expert_boundary(path)
    if boundary_ratio is not None and (sliced or kind == "vace"):
        raise ValueError(f"checkpoint {path} has two experts (transformer_2/, boundary_ratio {boundary_ratio}): "
                         f"{'a sliced load for a sharded learner' if sliced else 'kind vace'} is not supported with two experts")
    if sliced:
        weight_files = WeightFiles.of(path / "transformer")
        transformer = placeholder_transformer(path / "transformer", transformer_cls, dtype)
    else:
        transformer = _load_expert(path / "transformer", transformer_cls, dtype)
    widened = kind == "concat" and transformer.config.in_channels == vae_config["z_dim"]
    if kind == "concat":
        transformer = widen_for_source_conditioning(transformer, vae_config["z_dim"])
    check_kind(transformer, vae_config, kind)
    if boundary_ratio is not None:
        low = _load_expert(path / "transformer_2", transformer_cls, dtype)
        if kind == "concat":
            low = widen_for_source_conditioning(low, vae_config["z_dim"])
        check_kind(low, vae_config, kind)
        num_train_timesteps = json.loads(next((path / "scheduler").glob("*.json")).read_text()).get("num_train_timesteps", 1000)
        transformer = TwoExperts(transformer, low, boundary_ratio * num_train_timesteps)
    # the text encoder too loads in the model dtype (a UMT5-XXL is 23 GB in fp32, 11 GB in bf16)
    text_encoder = (UMT5EncoderModel.from_pretrained(path / "text_encoder", local_files_only=True, torch_dtype=dtype)
                    if encoders else None)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", local_files_only=True) if encoders else None
    scheduler = load_flow_scheduler(path / "scheduler")
    logger.info("loaded checkpoint %s (%s, kind %s, %s%s%s)", path, type(transformer).__name__, kind,
                str(dtype).removeprefix("torch."), "" if encoders else ", DiT only",
                ", DiT weights to be read a slice per rank" if sliced else "")
    return PolicyComponents(transformer, vae, text_encoder, tokenizer, scheduler, vae_config, weight_files, widened)


def _load_expert(path: Path, transformer_cls, dtype: torch.dtype):
    transformer = transformer_cls.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    if dtype != torch.float32:
        release_file_mappings(transformer)
    return transformer


def save_components(components: PolicyComponents, path: str | Path) -> None:
    """Save all components in the diffusers layout that :func:`load_components` reads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    experts = components.transformer.experts if isinstance(components.transformer, TwoExperts) else (components.transformer,)
    for name, expert in zip(EXPERT_NAMES, experts):
        expert.save_pretrained(path / name)
    components.vae.save_pretrained(path / "vae")
    components.text_encoder.save_pretrained(path / "text_encoder")
    components.tokenizer.save_pretrained(path / "tokenizer")
    components.scheduler.save_pretrained(path / "scheduler")
    is_vace = isinstance(components.transformer, WanVACETransformer3DModel)
    index = {
        "_class_name": "WanVACEPipeline" if is_vace else "WanPipeline",
        "transformer": ["diffusers", type(experts[0]).__name__],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", type(components.tokenizer).__name__],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    if len(experts) == 2:  # Wan2.2 A14B's layout
        index.update(transformer_2=["diffusers", type(experts[1]).__name__],
                     boundary_ratio=components.transformer.boundary_timestep / components.scheduler.config.num_train_timesteps)
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
