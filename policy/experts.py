"""Wan2.2 A14B's two experts as one DiT: a high-noise expert for the early steps and a
low-noise expert for the late ones, switched at a boundary timestep.

diffusers' ``WanPipeline`` (Wan2.2) runs ``transformer`` while the timestep ``t`` is at or
above ``boundary_ratio * num_train_timesteps`` and ``transformer_2`` below it. Here a batch
of rows may straddle the boundary (the learner batches steps): each row goes to its own
expert, so ``TwoExperts(x, t)`` equals the expert of ``t`` on every row. Both experts carry
the LoRA adapter (the same rank and targets; their own A and B matrices), so RL trains the
steps of both; the adapter's keys are the experts' names, ``transformer.`` and
``transformer_2.``, followed by each expert's own keys.
"""
from __future__ import annotations

import torch

EXPERT_NAMES = ("transformer", "transformer_2")
"""The experts' folder names in a diffusers Wan2.2 checkpoint, and their module names here."""


class TwoExperts(torch.nn.Module):
    """The high-noise expert ``transformer`` and the low-noise expert ``transformer_2``
    behind one forward that routes each row by its timestep.

    Args:
        high: the DiT used for timesteps ``>= boundary_timestep``.
        low: the DiT used below it (same class, config and input channels).
        boundary_timestep: ``boundary_ratio * num_train_timesteps`` (e.g. 0.875 * 1000).

    Raises:
        ValueError: the experts' configs differ in patch size, channels or class.
    """

    def __init__(self, high: torch.nn.Module, low: torch.nn.Module, boundary_timestep: float):
        super().__init__()
        if type(high) is not type(low):
            raise ValueError(f"the two experts are a {type(high).__name__} and a {type(low).__name__}")
        for key in ("patch_size", "in_channels", "out_channels", "text_dim"):
            if getattr(high.config, key) != getattr(low.config, key):
                raise ValueError(f"the two experts differ in {key}: {getattr(high.config, key)} and {getattr(low.config, key)}")
        self.transformer = high
        self.transformer_2 = low
        self.boundary_timestep = float(boundary_timestep)
        self._keep_in_fp32_modules = list(getattr(high, "_keep_in_fp32_modules", None) or [])

    @property
    def experts(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """``(high, low)``."""
        return self.transformer, self.transformer_2

    @property
    def config(self):
        """The high-noise expert's config (both share patch size and channels)."""
        return self.transformer.config

    @property
    def peft_config(self):
        return self.transformer.peft_config

    @property
    def gradient_checkpointing(self) -> bool:
        return self.transformer.gradient_checkpointing

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                return_dict: bool = False, **kwargs) -> tuple[torch.Tensor]:
        """Each row through the expert of its timestep.

        Args:
            hidden_states: ``(N, C_in, f, h, w)``; timestep: ``(N,)`` in ``[0, num_train_timesteps]``;
            encoder_hidden_states: ``(N, L, D)``; other keyword inputs are per row too.

        Returns:
            ``(out,)`` with ``out`` ``(N, C_out, f, h, w)``, as the experts return with ``return_dict=False``.
        """
        high = timestep >= self.boundary_timestep
        if bool(high.all()) or not bool(high.any()):
            expert = self.transformer if bool(high.all()) else self.transformer_2
            return expert(hidden_states, timestep, encoder_hidden_states, return_dict=False, **kwargs)
        out = None
        for expert, rows in ((self.transformer, high), (self.transformer_2, ~high)):
            index = rows.nonzero().squeeze(1)
            part = expert(hidden_states[index], timestep[index], encoder_hidden_states[index], return_dict=False,
                          **{k: v[index] for k, v in kwargs.items()})[0]
            if out is None:
                out = part.new_empty((hidden_states.shape[0], *part.shape[1:]))
            out[index] = part
        return (out,)

    # peft and diffusers model methods the policy, the learner and the rollout engine call: on both experts
    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        for expert in self.experts:
            expert.add_adapter(adapter_config, adapter_name=adapter_name)

    def disable_adapters(self) -> None:
        for expert in self.experts:
            expert.disable_adapters()

    def enable_adapters(self) -> None:
        for expert in self.experts:
            expert.enable_adapters()

    def enable_gradient_checkpointing(self) -> None:
        for expert in self.experts:
            expert.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        for expert in self.experts:
            expert.disable_gradient_checkpointing()

    def set_attention_backend(self, backend: str) -> None:
        for expert in self.experts:
            expert.set_attention_backend(backend)

    def compile_repeated_blocks(self, **kwargs) -> None:
        for expert in self.experts:
            expert.compile_repeated_blocks(**kwargs)
