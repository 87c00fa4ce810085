"""FSDP2 sharding and Ulysses sequence parallelism of the learner's DiT over its ranks.

Every transformer block (and VACE's context blocks) is its own ``fully_shard`` unit and
the transformer is the root unit, so a rank holds 1/N of every weight and all-gathers one
block at a time for its forward and backward (resharded after each). Parameters are
gathered in ``param_dtype`` for compute; gradients are reduce-scattered in fp32 and summed
(not averaged) over the ranks, because each rank's loss is already divided by the whole
minibatch's term count (:mod:`editrl.learner.data_parallel`). The LoRA adapter keeps its
fp32 master weights and the AdamW state on their shards.

Every forward and backward of a sharded module is a collective: all ranks must run the
same number of them in the same order (the learner pads a rank with fewer work items with
zero-weight repeats, :func:`editrl.learner.work.items_per_rank`).

Sequence parallelism (:func:`split_sequences`) is diffusers' context parallelism for Wan
in its Ulysses form: inside a group of k consecutive ranks every block sees 1/k of each
sequence's tokens, and attention swaps the split from tokens to heads with two
all-to-alls, so activations per rank are about 1/k; the output is gathered whole after
the last block.
"""
from __future__ import annotations

import contextlib
import logging
from unittest import mock

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def sharded_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that become FSDP2 units: Wan's ``blocks`` and, for VACE, ``vace_blocks``."""
    return [*transformer.blocks, *getattr(transformer, "vace_blocks", [])]


def shard_transformer(transformer: torch.nn.Module, world_size: int, device_type: str, param_dtype: torch.dtype) -> int:
    """Shard ``transformer`` in place over the ``world_size`` ranks of the default process group.

    Args:
        transformer: the DiT with its LoRA adapter attached, on this rank's device.
        world_size: the ranks of the default process group (a 1-D device mesh).
        device_type: ``cpu`` (gloo) or ``cuda`` (NCCL).
        param_dtype: the dtype parameters are all-gathered in for compute (bf16 on GPUs).

    Returns:
        How many blocks became FSDP2 units (the root not counted).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised (from ``init_device_mesh``).
    """
    mesh = init_device_mesh(device_type, (world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = sharded_blocks(transformer)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(transformer, mesh=mesh, mp_policy=policy)
    for unit in [*blocks, transformer]:  # per unit: these settings are not recursive
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return len(blocks)


def split_sequences(transformer: torch.nn.Module, world_size: int, degree: int, device_type: str) -> None:
    """Ulysses sequence parallelism of degree ``degree`` over groups of consecutive ranks.

    Builds the ``(data, ring = 1, ulysses = degree)`` device mesh over the ``world_size``
    ranks of the default process group and applies diffusers' context-parallel plan of the
    Wan transformer with PyTorch's native attention backend (the one that runs on CPUs).
    Each rank's parameter gradients then cover its 1/degree of the tokens: sum them over
    the ranks (both sharding modes do). Call it before :func:`shard_transformer`.

    Raises:
        ValueError: the transformer has no context-parallel plan (VACE in diffusers today),
            or its attention heads do not divide into ``degree`` parts.
    """
    if getattr(transformer, "_cp_plan", None) is None:
        raise ValueError(f"topology.learner.sequence_parallel={degree}: diffusers has no context-parallel plan for "
                         f"{type(transformer).__name__}")
    heads = transformer.config.num_attention_heads
    if heads % degree:
        raise ValueError(f"topology.learner.sequence_parallel={degree} must divide the DiT's {heads} attention heads")
    from diffusers import ContextParallelConfig

    mesh = init_device_mesh(device_type, (world_size // degree, 1, degree), mesh_dim_names=("data", "ring", "ulysses"))
    transformer.set_attention_backend("native")
    # diffusers picks the rank's device as rank % accelerator count, which is 0 on a CPU-only
    # host; the mesh given here already names the device type, so one "device" is right there
    patch = mock.patch.object(torch.accelerator, "device_count", lambda: 1) if device_type == "cpu" else contextlib.nullcontext()
    with patch:
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree, mesh=mesh))
    # the per-call notice that a 1-D timestep is not split (it needs no split) is not news
    logging.getLogger("diffusers.hooks.context_parallel").setLevel(logging.ERROR)
