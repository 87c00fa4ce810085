"""How a rollout worker runs its model: storage dtype of the trajectories, rows per
forward, where the text encoder lives, how the VAE decodes, the attention backend and
compilation, and the threads that encode videos beside the sampling slot.

The fields mirror ``rollout.*`` of the run's config (:class:`editrl.cluster.config.RolloutConfig`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from editrl.policy.policy import EditPolicy

logger = logging.getLogger(__name__)

TRAJECTORY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
VAE_DECODES = ("batch", "slices", "tiles")
TEXT_ENCODER_PLACES = ("resident", "offload")


@dataclass(frozen=True)
class RolloutEngine:
    """A rollout worker's engine settings (see ``rollout.*`` in the run's config for each)."""

    trajectory_dtype: str = "auto"
    """Dtype of the latents a group carries: ``float32``, ``bfloat16``, ``float16`` or ``auto``
    (:meth:`resolved`)."""
    forward_micro_batch: int | None = None
    """Rows (samples x CFG branches) per transformer forward; None: all at once."""
    encode_threads: int = 2
    """Threads encoding edits as mp4 beside the sampling slot; 0: on the sampling slot."""
    text_encoder: str = "resident"
    """``resident`` on the device, or ``offload``: in host memory between encodings."""
    vae_decode: str = "batch"
    """``batch``, ``slices`` (one video at a time) or ``tiles`` (and spatial tiles)."""
    attention_backend: str | None = None
    """diffusers attention backend of the transformer; None: PyTorch's SDPA."""
    compile_blocks: bool = False
    """``torch.compile`` the transformer's repeated blocks."""

    @property
    def torch_trajectory_dtype(self) -> torch.dtype:
        """The trajectory dtype as torch's (of a :meth:`resolved` engine).

        Raises:
            KeyError: ``auto`` not resolved yet.
        """
        return TRAJECTORY_DTYPES[self.trajectory_dtype]

    def resolved(self, device: str) -> "RolloutEngine":
        """The engine with ``trajectory_dtype: auto`` made concrete for ``device``: float32 on the
        CPU, bfloat16 on a CUDA device that has it, float16 on one that does not."""
        if self.trajectory_dtype != "auto":
            return self
        if torch.device(device).type != "cuda":
            dtype = "float32"
        else:
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        return dataclasses.replace(self, trajectory_dtype=dtype)

    def check(self, device: str) -> None:
        """Refuse settings this worker's ``device`` cannot use, before the model loads (call it on
        a :meth:`resolved` engine).

        Raises:
            ValueError: an unknown value, a micro-batch or thread count below its minimum, or a
                16-bit trajectory dtype that the CUDA device does not support (naming the device).
        """
        if self.trajectory_dtype not in TRAJECTORY_DTYPES:
            raise ValueError(f"rollout.trajectory_dtype={self.trajectory_dtype!r}: expected one of {list(TRAJECTORY_DTYPES)}")
        if self.forward_micro_batch is not None and self.forward_micro_batch < 1:
            raise ValueError(f"rollout.forward_micro_batch={self.forward_micro_batch}: must be >= 1 (or None)")
        if self.encode_threads < 0:
            raise ValueError(f"rollout.encode_threads={self.encode_threads}: must be >= 0")
        if self.vae_decode not in VAE_DECODES:
            raise ValueError(f"rollout.vae_decode={self.vae_decode!r}: expected one of {list(VAE_DECODES)}")
        if self.text_encoder not in TEXT_ENCODER_PLACES:
            raise ValueError(f"rollout.text_encoder={self.text_encoder!r}: expected one of {list(TEXT_ENCODER_PLACES)}")
        if torch.device(device).type == "cuda" and self.trajectory_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"rollout.trajectory_dtype=bfloat16: {torch.cuda.get_device_name()} has no bfloat16 "
                             "(compute capability below 8.0); use float16 or float32")

    def apply(self, policy: EditPolicy) -> None:
        """Set up a freshly loaded ``policy``: VAE slicing or tiling, the attention backend, block
        compilation, and the text encoder moved to host memory when offloaded.

        Raises:
            ValueError: an attention backend diffusers does not know or cannot use here (its message).
        """
        if policy.vae is not None and self.vae_decode != "batch":
            policy.vae.enable_slicing()
            if self.vae_decode == "tiles":
                policy.vae.enable_tiling()
        if self.attention_backend is not None:
            policy.transformer.set_attention_backend(self.attention_backend)
        if self.compile_blocks:
            policy.transformer.compile_repeated_blocks(dynamic=True)
        if self.text_encoder == "offload" and policy.text_encoder is not None:
            policy.text_encoder.to("cpu")
        logger.info("rollout engine: %s", self)

    @contextlib.contextmanager
    def text_encoder_on_device(self, policy: EditPolicy) -> Iterator[None]:
        """The text encoder on the policy's device for the duration (an offloaded one is moved
        there and back to host memory afterwards)."""
        offloaded = self.text_encoder == "offload" and policy.text_encoder is not None and policy.device.type != "cpu"
        if offloaded:
            policy.text_encoder.to(policy.device)
        try:
            yield
        finally:
            if offloaded:
                policy.text_encoder.to("cpu")
                if policy.device.type == "cuda":
                    torch.cuda.empty_cache()
