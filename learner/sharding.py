"""FSDP2 sharding and Ulysses sequence parallelism of the learner's DiT over its ranks.

Every transformer block (and VACE's context blocks) is its own ``fully_shard`` unit and
the transformer is the root unit, so a rank holds 1/N of every weight and all-gathers one
block at a time for its forward and backward (resharded after each); gradients are reduce-scattered in fp32 and summed
(not averaged) over the ranks, because each rank's loss is already divided by the whole
minibatch's term count (:mod:`editrl.learner.data_parallel`). The LoRA adapter keeps its
fp32 master weights and the AdamW state on their shards. By default every parameter
computes in its own dtype, as in the rollout workers' unsharded model, so the learner's
log-probs are theirs (:func:`shard_transformer`).

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
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def sharded_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that become FSDP2 units: Wan's ``blocks`` and, for VACE, ``vace_blocks``."""
    return [*transformer.blocks, *getattr(transformer, "vace_blocks", [])]


def shard_transformer(transformer: torch.nn.Module, world_size: int, device_type: str,
                      param_dtype: torch.dtype | None = None) -> int:
    """Shard ``transformer`` in place over the ``world_size`` ranks of the default process group.

    Every block (and the root) becomes a ``fully_shard`` unit. With ``param_dtype`` None each
    parameter computes in its own dtype, exactly as the unsharded model does (bf16 weights,
    the fp32 modules Wan keeps, the fp32 LoRA adapter): FSDP2 needs one dtype per unit, so
    inside each block the modules whose parameters have another dtype than the block's
    weights (the adapter's A and B, the fp32 norms) form one more unit per dtype, and a bare
    parameter of another dtype (Wan's frozen fp32 ``scale_shift_table``) is left out of the
    sharding, whole on every rank. With a ``param_dtype`` every parameter is gathered in it
    (FSDP2 mixed precision; the adapter then computes in it too). Gradients are always
    reduced in fp32.

    Args:
        transformer: the DiT with its LoRA adapter attached.
        world_size: the ranks of the default process group (a 1-D device mesh).
        device_type: ``cpu`` (gloo) or ``cuda`` (NCCL; this rank's current CUDA device).
        param_dtype: the dtype parameters are gathered in for compute; None keeps each one's.

    Returns:
        How many blocks became FSDP2 units (the root and the per-dtype units not counted).

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised (from ``init_device_mesh``).
        ValueError: a module's own parameters have mixed dtypes.
    """
    mesh = init_device_mesh(device_type, (world_size,))
    device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    blocks = sharded_blocks(transformer)
    units: list[torch.nn.Module] = []
    for block in [*blocks, transformer]:
        ignored: set[torch.nn.Parameter] = set()
        if param_dtype is None:
            main, others = _dtype_groups(block)
            for modules in others.values():
                fully_shard(modules, mesh=mesh, mp_policy=policy)
                units.extend(modules)
            ignored = {p for p in block.parameters(recurse=False) if p.dtype != main}
            for param in ignored:  # FSDP2 neither shards nor moves what it ignores
                if not param.is_meta:
                    param.data = param.data.to(device)
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=ignored or None)
        units.append(block)
    for unit in units:  # per unit: these settings are not recursive
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    return len(blocks)


def _dtype_groups(block: torch.nn.Module) -> tuple[torch.dtype, dict[torch.dtype, list[torch.nn.Module]]]:
    """The dtype holding most of ``block``'s not yet sharded parameter bytes, and per other dtype
    the submodules whose own parameters have it (the subtrees of units already made are skipped).

    Raises:
        ValueError: a module's own parameters have mixed dtypes.
    """
    owners: list[tuple[torch.nn.Module, torch.dtype]] = []
    sizes: dict[torch.dtype, int] = {}

    def visit(module: torch.nn.Module) -> None:
        own = list(module.parameters(recurse=False))
        dtypes = {p.dtype for p in own}
        if len(dtypes) > 1:
            raise ValueError(f"{type(module).__name__} has parameters of dtypes {sorted(map(str, dtypes))}")
        if own:
            owners.append((module, own[0].dtype))
            sizes[own[0].dtype] = sizes.get(own[0].dtype, 0) + sum(p.numel() * p.element_size() for p in own)
        for child in module.children():
            if not isinstance(child, FSDPModule):
                visit(child)

    visit(block)
    main = max(sizes, key=sizes.get) if sizes else torch.float32
    others: dict[torch.dtype, list[torch.nn.Module]] = {}
    for module, dtype in owners:
        if dtype != main and module is not block:
            others.setdefault(dtype, []).append(module)
    return main, others


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
