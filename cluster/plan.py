"""``editrl plan``: the memory a run's processes need, worked out from its config before
anything starts, and whether it fits the devices.

For each process kind (rollout worker, learner rank, reward replica) the plan lists what
it holds (weights, LoRA adapter and optimiser state, trajectories, activations) and its
estimated peak: what it holds throughout plus the largest of its working phases. The
parameter counts and the bytes autograd saves per token come from
:mod:`editrl.policy.memory` (networks on the meta device, saved-tensor probes); the
learner's estimate is checked against the measured peak RSS of a learner process in
``tests/test_plan.py``. The rollout worker's inference and VAE-decode working sets and the
reward replica's are estimates from the tensor sizes, not yet measured.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from editrl.cluster.config import TrainConfig
from editrl.cluster.preflight import ModelFactors
from editrl.policy.geometry import vae_scale_factors
from editrl.policy.memory import DTYPE_BYTES, Architecture, ModelSizes, activation_model, architecture, model_sizes
from editrl.policy.schedule import stochastic_steps
from editrl.protocol.rollout import trained_positions

MIB, GIB = 2**20, 2**30
RUNTIME_BYTES = {"cpu": 440 * MIB, "cuda": 1 * GIB}
"""Memory of a process before it loads anything: on the CPU, Python with torch, diffusers,
transformers and peft imported (433 MiB measured with torch 2.13's CPU build); on a GPU, the
CUDA context and library workspaces on the device (an estimate)."""


@dataclass(frozen=True)
class Item:
    """One thing a process holds: held throughout (``phase`` None) or only in one working phase."""

    name: str
    bytes: float
    note: str = ""
    phase: str | None = None


@dataclass
class ProcessPlan:
    """The estimated memory of one process of a kind; ``limit`` is its device's memory (None: not checked here)."""

    kind: str
    count: int
    device: str
    items: list[Item] = field(default_factory=list)
    limit: float | None = None

    @property
    def peak(self) -> float:
        """Everything held throughout plus the largest phase's working set (bytes)."""
        phases: dict[str, float] = {}
        for item in self.items:
            if item.phase is not None:
                phases[item.phase] = phases.get(item.phase, 0.0) + item.bytes
        return sum(i.bytes for i in self.items if i.phase is None) + max(phases.values(), default=0.0)

    @property
    def fits(self) -> bool | None:
        return None if self.limit is None else self.peak <= self.limit


@dataclass
class Plan:
    """A run's processes, the model they hold and the compute of one forward."""

    source: str
    sizes: ModelSizes
    tokens: int
    processes: list[ProcessPlan]
    forward_tflop: float
    """TFLOP of one forward of one sequence through the DiT (2 x tokens x linear weights
    plus the attention products)."""
    host_limit: float | None = None
    """CPU runs: this host's memory, which all processes share."""
    group_bytes: float = 0.0
    """Bytes of one group as it travels to the learner (:func:`group_bytes` at the stored positions)."""
    groups_per_update: int = 1
    """B, the groups of one update."""
    inflight_budget: float | None = None
    """``runtime.max_inflight_mib`` in bytes (None: no budget)."""

    def problems(self) -> list[str]:
        """One line per process kind that does not fit, with the numbers, and one for a budget of
        groups in flight below one update's groups; empty when all fit."""
        out = [f"{p.kind}: estimated peak {p.peak / GIB:.1f} GiB > {p.limit / GIB:.1f} GiB of device memory "
               f"(largest: {_largest(p)})" for p in self.processes if p.fits is False]
        need = self.groups_per_update * self.group_bytes
        if self.inflight_budget is not None and self.inflight_budget < need:
            out.append(f"runtime.max_inflight_mib={self.inflight_budget / MIB:g} MiB holds fewer groups than one update: "
                       f"{self.groups_per_update} groups of {self.group_bytes / MIB:.2f} MiB need {need / MIB:.2f} MiB")
        if self.host_limit is not None:
            total = sum(p.peak * p.count for p in self.processes if p.device == "cpu")
            if total > self.host_limit:
                out.append(f"all processes on this host: estimated {total / GIB:.1f} GiB > {self.host_limit / GIB:.1f} GiB of memory")
        return out


def count_text(n: float) -> str:
    """A parameter count with a unit: ``14.29 B``, ``209.7 M``, ``33.8 k``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.{2 if unit == 'B' else 1}f} {unit}"
    return f"{n:.0f}"


def bytes_text(n: float) -> str:
    """Bytes with a binary unit: ``28.6 GiB``, ``12.3 MiB``."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def _largest(process: ProcessPlan) -> str:
    item = max(process.items, key=lambda i: i.bytes)
    return f"{item.name} {item.bytes / GIB:.1f} GiB"


def factors(arch: Architecture, patch: tuple[int, int, int]) -> ModelFactors:
    """The VAE factors and patch size of ``arch`` (read from its configs, on disk or published)."""
    spatial, temporal = vae_scale_factors(arch.vae)
    return ModelFactors(spatial, temporal, patch, arch.source)


def _stochastic(config: TrainConfig) -> list[int]:
    p = config.policy
    if p.sampler == "ode":
        return []
    w = p.sde_window
    flags = (stochastic_steps(p.num_steps, p.sde_fraction) if w is None else
             stochastic_steps(p.num_steps, p.sde_fraction, w.size, w.position, w.start, w.stride, w.every))
    return [t for t, s in enumerate(flags) if s]


def stored_positions(config: TrainConfig) -> int:
    """Latents per trajectory a group carries to the learner: each trained step t and t + 1
    (:func:`editrl.protocol.rollout.trained_positions`; a window of w steps is w + 1), and the
    edit's for a forward-process learner (or when no step is stochastic)."""
    steps = _stochastic(config)
    positions = set(trained_positions([t in steps for t in range(config.policy.num_steps)]))
    if config.learner.forward_process or not positions:
        positions.add(config.policy.num_steps)
    return len(positions)


def trajectory_dtype(config: TrainConfig) -> str:
    """``rollout.trajectory_dtype`` with ``auto`` resolved as a worker does on its device (bfloat16
    on GPU workers: the plan assumes a GPU that has it)."""
    dtype = config.rollout.trajectory_dtype
    if dtype == "auto":
        return "bfloat16" if config.topology.rollout.gpus > 0 else "float32"
    return dtype


def sampled_positions(config: TrainConfig) -> int:
    """Latents per trajectory a rollout worker keeps while it samples: the stored ones and the edit's."""
    steps = _stochastic(config)
    return len({*trained_positions([t in steps for t in range(config.policy.num_steps)]), config.policy.num_steps})


def group_bytes(config: TrainConfig, sizes: ModelSizes, latent: tuple[int, int, int], positions: int | None = None,
                sampling: bool = False) -> float:
    """Bytes of one group: ``positions`` latents of each of its G trajectories (None: all ``T + 1``),
    in ``rollout.trajectory_dtype`` as it travels to the learner or in fp32 while a worker samples
    (``sampling``) or when all are kept; per-step log-probs; the recorded means with GRPO-Guard (at
    the trained steps as it travels, all T while sampling); the source latent and the two
    instruction embeddings (fp32)."""
    g, steps, cells = config.group_size, config.policy.num_steps, sizes.latent_channels * math.prod(latent)
    full = sampling or positions is None
    positions = steps + 1 if positions is None else positions
    latent_bytes = 4 if full else DTYPE_BYTES[trajectory_dtype(config)]
    trained = steps if full else len(_stochastic(config))
    means = g * trained * cells * 4 if config.learner.ratio_norm == "grpo_guard" else 0
    return g * positions * cells * latent_bytes + g * steps * 4 + means + cells * 4 + 2 * config.policy.max_text_tokens * sizes.text_dim * 4


def forward_tflop(sizes: ModelSizes, tokens: int, text_tokens: int) -> float:
    """FLOPs of one sequence's forward in TFLOP: ``2 N W`` for the linear weights W of every
    block, ``4 N^2 D`` for self-attention's two products and ``4 N L D`` for cross-attention's."""
    blocks = sizes.layers + sizes.vace_layers
    flop = blocks * (2 * tokens * sizes.linear_per_block + 4 * tokens**2 * sizes.width + 4 * tokens * text_tokens * sizes.width)
    return flop / 1e12


def _learner(config: TrainConfig, sizes: ModelSizes, arch: Architecture, tokens: int, group: float) -> ProcessPlan:
    policy, learner, ranks = config.policy, config.learner, config.topology.learner
    device = "cuda" if ranks.gpus > 0 else "cpu"
    samples = learner.micro_batch_samples or config.group_size
    branches = 2 if policy.guidance_scale != 1.0 and learner.cfg_null_grad else 1
    sequences = min(samples, config.group_size) * branches * learner.timesteps_per_forward
    mode = learner.activation_checkpointing
    checkpointing = mode == "on" or (mode == "auto" and tokens >= learner.checkpointing_min_tokens)
    model = activation_model(arch, policy.lora, policy.dtype, policy.kind, policy.max_text_tokens)
    per_sequence = {on: model.peak_bytes(sizes, tokens, on) for on in (False, True)}
    split = ranks.sequence_parallel  # Ulysses: every block's tensors hold 1/split of the tokens (of the heads in attention)
    shards = ranks.ranks if ranks.sharding == "fsdp" else 1
    weights = [Item("DiT weights", sizes.weight_bytes(policy.dtype), f"{count_text(sizes.dit)} parameters, {policy.dtype}"),
               Item("LoRA adapter, gradient, AdamW state", 16 * sizes.lora, f"{count_text(sizes.lora)} parameters x 4 fp32 copies")]
    if shards > 1:  # FSDP2: 1/ranks of each, plus the block computing and the next one prefetched, gathered
        gathered = learner.fsdp_param_dtype or policy.dtype
        weights = [Item(item.name, item.bytes / shards, f"1/{shards} shard of {item.note}") for item in weights]
        weights.append(Item("gathered blocks", 2 * sizes.linear_per_block * DTYPE_BYTES[gathered],
                            f"two blocks' linear weights in {gathered} (computing, prefetched)"))
    items = [
        Item("runtime", RUNTIME_BYTES[device]),
        *weights,
        Item("groups of one update", config.prompts_per_step * group,
             f"{config.prompts_per_step} groups of {bytes_text(group)} ({stored_positions(config)} latents per trajectory)"),
        Item("activations", sequences * per_sequence[checkpointing] / split,
             f"{sequences} sequences of {tokens} tokens per micro-batch{f', 1/{split} of each on this rank' if split > 1 else ''}, "
             f"checkpointing {'on' if checkpointing else 'off'}; "
             f"per sequence {bytes_text(per_sequence[False])} without, {bytes_text(per_sequence[True])} with",
             phase="backward"),
    ]
    if policy.kind == "vace":
        items.insert(2, Item("VAE weights", 4 * sizes.vae, "for the VACE context (fp32)"))
    return ProcessPlan("learner rank", ranks.ranks, device, items)


def _rollout(config: TrainConfig, sizes: ModelSizes, arch: Architecture, tokens: int, group: float) -> ProcessPlan:
    policy, workers, engine = config.policy, config.topology.rollout, config.rollout
    device = "cuda" if workers.gpus > 0 else "cpu"
    g, b = config.group_size, DTYPE_BYTES[policy.dtype]
    branches = 2 if policy.guidance_scale != 1.0 else 1
    rows = engine.forward_micro_batch or g * branches
    pixels = policy.num_frames * policy.height * policy.width
    first_stage = arch.vae["base_dim"] * arch.vae["dim_mult"][0]
    temporal = vae_scale_factors(arch.vae)[1]
    videos = g if engine.vae_decode == "batch" else 1
    # diffusers' VAE tiles are 256 x 256 pixels: a tiled decode holds one tile's maps at a time
    area = min(1.0, 256 * 256 / (policy.height * policy.width)) if engine.vae_decode == "tiles" else 1.0
    offloaded = engine.text_encoder == "offload" and device == "cuda"
    items = [
        Item("runtime", RUNTIME_BYTES[device]),
        Item("DiT weights and adapter", sizes.weight_bytes(policy.dtype) + 4 * sizes.lora, f"{policy.dtype}, LoRA fp32"),
        Item("text encoder", 0.0 if offloaded else sizes.text_encoder * b,
             f"{count_text(sizes.text_encoder)} parameters{', in host memory between encodings' if offloaded else ''}"),
        Item("VAE", 4 * sizes.vae, f"{count_text(sizes.vae)} parameters, fp32"),
        Item("group being sampled", group, f"{g} trajectories of {sampled_positions(config)} of {policy.num_steps + 1} latents, fp32"
             f"{' (host memory)' if device == 'cuda' else ''}"),
        Item("denoising forward", rows * tokens * (2 * sizes.ffn_dim + 4 * sizes.width) * b,
             f"{rows} of {g * branches} sequences per forward (rollout.forward_micro_batch): one block's live tensors (estimate)",
             phase="sample"),
        Item("decoded videos", g * pixels * 3 * 5, "fp32 frames and their uint8 copies", phase="decode"),
        Item("VAE decode", videos * area * 6 * first_stage * temporal * policy.height * policy.width * 4,
             f"six {first_stage}-channel fp32 maps per {temporal}-frame chunk of {videos} video(s) "
             f"(rollout.vae_decode: {engine.vae_decode}; estimate)", phase="decode"),
    ]
    return ProcessPlan("rollout worker", workers.workers, device, items)


def _reward_config(config: TrainConfig):
    from editrl.reward_server.config import load_server_config

    return load_server_config(config.reward_server.config)


def _reward(config: TrainConfig) -> ProcessPlan:
    policy, replicas = config.policy, config.topology.reward
    device = "cuda" if replicas.gpus > 0 else "cpu"
    video = policy.num_frames * policy.height * policy.width * 3
    items = [Item("runtime", RUNTIME_BYTES[device])]
    try:
        server = _reward_config(config)
    except (OSError, ValueError) as exc:
        items.append(Item("decoded videos", 0.0, f"reward-server config not read: {exc}"))
        return ProcessPlan("reward replica", replicas.replicas, device, items)
    batch = server.max_batch_size
    items.append(Item("decoded videos", batch * 2 * video * 5, f"{batch} items x source and edit, uint8 and fp32", phase="score"))
    for name, spec in server.reward.backends.items():
        model = getattr(spec, "model", None)
        if getattr(spec, "engine", None) in ("transformers", "vllm") and model and Path(model).is_dir():
            weights = sum(f.stat().st_size for f in Path(model).rglob("*") if f.suffix in (".safetensors", ".bin"))
            items.append(Item(f"{name} VLM weights", weights, f"files in {model}"))
    return ProcessPlan("reward replica", replicas.replicas, device, items)


def host_memory_bytes() -> float:
    """Physical memory of this machine (bytes)."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def plan_run(config: TrainConfig, root: str | Path = ".") -> Plan:
    """The plan of ``config``'s processes.

    Device limits: a process on GPUs is checked against ``runtime.device_memory_gib`` times
    its GPUs when that is set; processes on the CPU together against this host's memory
    when nothing runs on GPUs.

    Raises:
        FileNotFoundError: the checkpoint is neither on disk nor a published architecture.
    """
    arch = architecture(config.policy, root)
    sizes = model_sizes(arch, config.policy.lora, config.policy.kind)
    model = factors(arch, tuple(sizes.patch))
    latent, tokens = model.latent_size(config.policy), model.tokens(config.policy)
    sampling = group_bytes(config, sizes, latent, sampled_positions(config), sampling=True)
    stored = group_bytes(config, sizes, latent, stored_positions(config))
    processes = [_rollout(config, sizes, arch, tokens, sampling), _learner(config, sizes, arch, tokens, stored), _reward(config)]
    memory = config.runtime.device_memory_gib
    topology = config.topology
    gpus = {"rollout worker": topology.rollout.gpus, "learner rank": topology.learner.gpus, "reward replica": topology.reward.gpus}
    for process in processes:
        if process.device == "cuda" and memory is not None:
            process.limit = memory * GIB * max(1.0, gpus[process.kind])
    on_gpu = any(p.device == "cuda" for p in processes)
    budget = config.runtime.max_inflight_mib
    return Plan(arch.source, sizes, tokens, processes, forward_tflop(sizes, tokens, config.policy.max_text_tokens),
                host_limit=None if on_gpu else host_memory_bytes(), group_bytes=stored,
                groups_per_update=config.prompts_per_step, inflight_budget=None if budget is None else budget * MIB)


def format_plan(plan: Plan) -> str:
    """The plan as a text report (sizes in GiB)."""
    s = plan.sizes
    lines = [f"model: {plan.source}",
             f"  DiT {count_text(s.dit)} parameters ({s.layers} blocks{f' + {s.vace_layers} VACE' if s.vace_layers else ''}, "
             f"width {s.width}, FFN {s.ffn_dim}); text encoder {count_text(s.text_encoder)}; VAE {count_text(s.vae)}; "
             f"LoRA {count_text(s.lora)}",
             f"  {plan.tokens} tokens per sequence; one forward {plan.forward_tflop:.2f} TFLOP", ""]
    for p in plan.processes:
        limit = "not checked" if p.limit is None else f"{p.limit / GIB:.1f} GiB: {'fits' if p.fits else 'DOES NOT FIT'}"
        lines.append(f"{p.kind} (x{p.count}, {p.device}): estimated peak {bytes_text(p.peak)}; device memory {limit}")
        for item in p.items:
            phase = f" [{item.phase}]" if item.phase else ""
            lines.append(f"  {item.name:<36}{bytes_text(item.bytes):>12}{phase:<12}  {item.note}")
        lines.append("")
    if plan.host_limit is not None:
        total = sum(p.peak * p.count for p in plan.processes if p.device == "cpu")
        lines.append(f"all processes on this host: {bytes_text(total)} of {bytes_text(plan.host_limit)}")
    return "\n".join(lines).rstrip() + "\n"


def plan_dict(plan: Plan) -> dict:
    """The plan as JSON-ready data (bytes)."""
    return {"source": plan.source, "tokens": plan.tokens, "forward_tflop": plan.forward_tflop,
            "host_limit": plan.host_limit, "problems": plan.problems(),
            "processes": [{"kind": p.kind, "count": p.count, "device": p.device, "peak": p.peak, "limit": p.limit,
                           "fits": p.fits, "items": {i.name: i.bytes for i in p.items}} for p in plan.processes]}
