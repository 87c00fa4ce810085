"""The resolved configuration of a training run, one pydantic model per component.

A preset is one YAML file under ``configs/``; the resolved config is saved in
every run directory as ``config.yaml``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from editrl.cluster.topology import TopologyConfig, moved_fields
from editrl.learner.config import LearnerConfig
from editrl.policy.config import PolicyConfig
from editrl.resources import resolve_path


class DataConfig(BaseModel):
    """Where the prompts come from."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    train_prompts: str = "assets/clips/prompts_train.parquet"
    """Prompt table of training prompts: ``.parquet``, ``.jsonl`` or ``.csv`` with at least ``video_path`` and
    ``instruction`` (schema: :mod:`editrl.protocol.prompt_table`, ``assets/clips/README.md``; check one with
    ``editrl data check``). A relative path: the current directory, then the files bundled with editrl."""
    heldout_prompts: str = "assets/clips/prompts_heldout.parquet"
    """Prompt table of held-out prompts (unseen clips), used only for evaluation; same schema and lookup as ``train_prompts``."""
    balance: Literal["none", "edit_type"] = "none"
    """``edit_type``: every step draws its prompts round-robin over buckets (each checkable
    edit type, and one bucket for all other edits), so opposite edits (brighter / darker,
    warm / cool) share each update instead of pulling the adapter one way per step."""
    encode_cache: str | None = None
    """Directory of precomputed source latents and instruction embeddings that the rollout workers
    read instead of running the VAE encoder and the text encoder (``editrl data cache TABLE --config
    X --out DIR``, once per table: :mod:`editrl.rollout_workers.encode_cache`). Its manifest's
    fingerprint (checkpoint and its encoder configs, kind, dtype, height, width, num_frames, fps,
    max_text_tokens; for a model built in code its sizes, seed and vocabulary) must match this run's
    policy, else every worker refuses to start naming the differing fields. A clip or instruction
    the cache lacks is encoded by the worker (one warning each), so a partial cache gives the same
    results. Same lookup as ``train_prompts``; None: the workers encode everything."""


class RolloutConfig(BaseModel):
    """The rollout workers (Ray actors)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    torch_threads: int = Field(1, ge=1)
    """CPU threads torch uses inside each actor."""
    reward_timeout_s: float = Field(120.0, gt=0)
    """Per-attempt HTTP timeout of scoring requests, seconds."""
    reward_max_attempts: int = Field(5, ge=1)
    """Attempts per scoring request (retries with exponential backoff)."""
    reward_concurrency: int = Field(4, ge=1)
    """Scoring requests each worker keeps in flight in pipelined mode; also the most
    groups a worker holds sampled and waiting for scores (``runtime.prefetch_per_worker``)."""
    reward_video_format: Literal["mp4", "raw"] = "mp4"
    """How videos travel to the reward server: ``mp4`` (small requests, the server
    decodes) or ``raw`` uint8 frames (no encoding or decoding; requests of
    ``F * H * W * 3`` bytes per video, base64). See docs/reward_server.md."""
    max_restarts: int = Field(3, ge=0)
    """Times Ray restarts a crashed rollout actor; its groups are re-issued."""
    trajectory_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the latents a group carries to the learner (the positions around the trained
    steps). 16-bit halves a group's bytes; each stored latent is rounded to it before its
    log-prob is taken and before the next step starts from it, so the on-policy ratio stays
    exactly 1. ``auto``: float32 on a CPU worker, bfloat16 on a GPU worker (float16 on a GPU
    without bfloat16)."""
    forward_micro_batch: int | None = Field(None, ge=1)
    """Rows (samples x CFG branches) per transformer forward while sampling: a group of G with
    guidance runs 2G rows per step, ``2G / forward_micro_batch`` forwards of this many, so any G
    fits a GPU. Must divide the rows. None: all rows in one forward."""
    encode_threads: int = Field(2, ge=0)
    """Threads that encode a group's edited videos as mp4 for the reward server, beside the
    sampling slot: the next group samples while the last one encodes. 0 encodes on the
    sampling slot (one video after the other)."""
    text_encoder: Literal["resident", "offload"] = "resident"
    """Where the text encoder lives between encodings (embeddings are cached per instruction):
    ``resident`` on the worker's device; ``offload`` in host memory, moved to the device for an
    encoding and back (a UMT5-XXL is 11 GB in bf16). The same on a CPU worker."""
    vae_decode: Literal["batch", "slices", "tiles"] = "batch"
    """How the VAE decodes a group's edits: ``batch`` all G at once, ``slices`` one video at a
    time, ``tiles`` one video at a time in overlapping spatial tiles (diffusers' VAE slicing and
    tiling; the least memory, seams blended)."""
    attention_backend: str | None = None
    """diffusers attention backend of the rollout transformer (``native``, ``flash``,
    ``_native_cudnn``, ``sage``, ...; see ``diffusers.attention_dispatch``); None keeps
    PyTorch's scaled-dot-product attention."""
    compile_blocks: bool = False
    """``torch.compile`` the rollout transformer's repeated blocks (diffusers'
    ``compile_repeated_blocks``): one compilation per block shape, then faster steps on a GPU."""


class AutoscaleConfig(BaseModel):
    """Optional policy that resizes the rollout pool between learner steps."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    min_workers: int = Field(1, ge=1)
    """Never fewer rollout workers."""
    max_workers: int = Field(8, ge=1)
    """Never more rollout workers."""
    scale_up_learner_idle: float = Field(0.5, ge=0, le=1)
    """Add a worker when the learner waited for data more than this share of a step."""
    scale_down_stale: float = Field(0.3, ge=0, le=1)
    """Remove a worker when more than this share of a step's groups were dropped as stale."""
    cooldown_steps: int = Field(3, ge=1)
    """Steps between two resizes."""


class RuntimeConfig(BaseModel):
    """How sampling, scoring and learning are scheduled."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    mode: Literal["pipelined", "sequential"] = "pipelined"
    """``pipelined``: workers keep sampling while earlier groups are scored and the learner
    trains; ``sequential``: sample all, score all, train, like single-process reference loops."""
    max_staleness: int = Field(1, ge=0)
    """Oldest accepted data, in policy versions (0 = strictly on-policy); older groups are
    dropped and counted."""
    prefetch_per_worker: int = Field(2, ge=1)
    """Groups each worker holds waiting to be sampled or being sampled in pipelined mode
    (one sampling, the others queued). Groups it has sampled and is having scored come on
    top, up to ``rollout.reward_concurrency`` of them: a worker keeps sampling while a slow
    judge scores its earlier groups."""
    checkpoint_every: int = Field(10, ge=0)
    """Write a checkpoint every this many steps (and at the end); 0 only at the end."""
    device_memory_gib: float | None = Field(None, gt=0)
    """Memory of one GPU of the cluster in GiB (80 for an H100 or A100-80GB, 141 for an H200):
    ``editrl plan`` checks every process on GPUs against it (times its GPUs), and ``editrl
    train`` refuses a config whose plan does not fit. None: not checked (a CPU run is
    checked against the host's memory by ``editrl plan``)."""
    controller_name: str = "editrl-controller"
    """Name of the run's controller actor, the handle of ``editrl scale``."""
    autoscale: AutoscaleConfig | None = None
    """Resize the rollout pool automatically; None keeps the size set by config or ``editrl scale``."""
    on_score_failure: Literal["reissue", "drop"] = "reissue"
    """What happens to a group that was sampled but could not be scored (the reward server
    unreachable for all ``rollout.reward_max_attempts``, a rejected request, items the judge
    could not score): ``reissue`` hands the same task (id and seed) out again, to be sampled
    and scored anew, at most ``max_score_reissues`` times, then drops it; ``drop`` drops it at
    once. Either way it is logged and counted in ``groups_failed`` (re-issues also in
    ``groups_reissued``) and never trained on made-up rewards."""
    max_score_reissues: int = Field(3, ge=0)
    """Most re-issues of one group after failed scoring (``on_score_failure: reissue``)."""
    max_inflight_mib: float | None = Field(None, gt=0)
    """Budget of the groups' tensors in Ray's object store, MiB: the driver hands out no new
    task while the groups sampled or being sampled and not yet trained would exceed it (the
    workers wait; counted in ``data/stalls``) rather than letting the store spill to disk.
    Refused at start when smaller than one group. None: no budget."""


class RewardServerSettings(BaseModel):
    """Which reward server the run talks to."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    url: str | None = None
    """Base URL of a running reward server; None starts one for the run."""
    config: str = "configs/reward_server.yaml"
    """ServerConfig YAML of the server the run starts (ignored when ``url`` is set)."""
    startup_timeout_s: float = Field(120.0, gt=0)
    """How long to wait for the server (started, or at ``url``) to answer /healthz, seconds."""


class EvalConfig(BaseModel):
    """Held-out evaluation: deterministic (ODE) edits of unseen clips."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    seeds_per_prompt: int = Field(2, ge=1)
    """Initial noises per held-out prompt (the same ones at every evaluation)."""
    every_steps: int = Field(0, ge=0)
    """Evaluate every this many steps as well as at the start and end (0: start and end only)."""
    max_prompts: int | None = Field(None, ge=1)
    """Evaluate only the first this many held-out prompts (None: all of them)."""
    num_videos_saved: int = Field(4, ge=0)
    """Held-out edits written as mp4 (source | edit, side by side) at the start and end."""


class TrainConfig(BaseModel):
    """A whole Edit-GRPO run."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    seed: int = 0
    """Seeds prompt order, group noise and the learner."""
    steps: int = Field(40, ge=1)
    """Learner updates (each bumps the policy version)."""
    prompts_per_step: int = Field(4, ge=1)
    """B: prompts (groups) per step."""
    group_size: int = Field(4, ge=2)
    """G: trajectories per prompt."""
    max_failed_steps: int = Field(3, ge=1)
    """Stop the run after this many consecutive steps in which every group failed
    (e.g. the reward server is down), instead of skipping updates forever."""
    ray_address: str | None = None
    """Existing Ray cluster to join; None starts a local one."""
    fps: int = Field(8, ge=1)
    """Frames per second: source clips are sampled at this rate (frame k at ``start_s + k / fps``,
    see :func:`editrl.protocol.dataset.load_clip`), and the mp4s the run writes and sends play at it."""
    policy: PolicyConfig = PolicyConfig()
    """The policy (model, sampler, LoRA)."""
    learner: LearnerConfig = LearnerConfig()
    """Optimisation."""
    data: DataConfig = DataConfig()
    """Prompts."""
    rollout: RolloutConfig = RolloutConfig()
    """Rollout workers."""
    runtime: RuntimeConfig = RuntimeConfig()
    """Scheduling, staleness, checkpoints, scaling."""
    reward_server: RewardServerSettings = RewardServerSettings()
    """Reward server."""
    eval: EvalConfig = EvalConfig()
    """Held-out evaluation."""
    topology: TopologyConfig = TopologyConfig()
    """How many rollout workers, learner ranks and reward replicas, and what each reserves."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_moved_fields(cls, data):
        moved = moved_fields(data) if isinstance(data, dict) else []
        if moved:
            raise ValueError("; ".join(moved) + " (the counts and reservations of every process live in topology)")
        return data

    @model_validator(mode="after")
    def _check_pairs(self) -> "TrainConfig":
        if self.policy.antithetic and self.group_size % 2:
            raise ValueError(f"policy.antithetic pairs the samples of a group: group_size must be even, got {self.group_size}")
        rows = self.group_size * (2 if self.policy.guidance_scale != 1.0 else 1)
        micro = self.rollout.forward_micro_batch
        if micro is not None and rows % micro:
            raise ValueError(f"rollout.forward_micro_batch={micro} does not divide the {rows} rows of a sampling step "
                             f"(group_size {self.group_size} x {rows // self.group_size} CFG branches); "
                             f"divisors: {[d for d in range(1, rows + 1) if rows % d == 0]}")
        if self.topology.reward.replicas > 1 and self.reward_server.url is None:
            raise ValueError(f"topology.reward.replicas={self.topology.reward.replicas}: a run starts one reward server "
                             "itself; more replicas are a Ray Serve deployment at reward_server.url (cluster/reward_serve.yaml)")
        return self

    @model_validator(mode="after")
    def _check_algorithm(self) -> "TrainConfig":
        learner, policy, ranks = self.learner, self.policy, self.topology.learner
        if not learner.forward_process:
            if policy.sampler == "ode" or policy.eta == 0:
                raise ValueError(f"learner.algorithm=edit_grpo trains the log-probs of stochastic steps, and policy.sampler="
                                 f"{policy.sampler} with eta {policy.eta} has none; use flow_sde, flow_sde_wan or cps "
                                 "with eta > 0, or a forward-process algorithm (diffusion_nft, awm)")
            return self
        acting = policy.lora.active_steps or policy.num_steps
        if learner.forward_steps is not None and learner.forward_steps > acting:
            raise ValueError(f"learner.forward_steps={learner.forward_steps} exceeds the {acting} denoising steps the adapter "
                             f"acts on (policy.lora.active_steps={policy.lora.active_steps}, num_steps={policy.num_steps})")
        if ranks.sharding == "fsdp" or ranks.sequence_parallel > 1:
            raise ValueError(f"learner.algorithm={learner.algorithm} runs on one learner rank or replicated ranks; "
                             "topology.learner.sharding=fsdp and sequence_parallel > 1 are Edit-GRPO's only")
        return self


def parse_overrides(pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` strings as ``{dotted key: YAML-parsed value}``.

    Raises:
        SystemExit: a string without ``=``.
    """
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    return overrides


def load_train_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a YAML preset, apply ``overrides`` (nested dict), validate.

    A relative ``path`` is looked up in the current directory, then among the
    presets bundled with editrl (:func:`editrl.resources.resolve_path`).

    Raises:
        FileNotFoundError: no such file (the message names it).
        ValueError: the file is not valid YAML, or not a mapping (the message names the file and the line).
        pydantic.ValidationError: a field is wrong (the message names it).
    """
    resolved = resolve_path(path)
    if not resolved.is_file():
        raise FileNotFoundError(f"no such config file: {path}")
    try:
        with resolved.open(encoding="utf-8") as stream:  # the stream's name is in the error's position
            data = yaml.safe_load(stream) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{resolved}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{resolved}: expected a mapping of config fields, got {type(data).__name__}")
    for key, value in (overrides or {}).items():
        _set_nested(data, key.split("."), value)
    return TrainConfig.model_validate(data)


def _set_nested(data: dict, keys: list[str], value) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
    data[keys[-1]] = value


def with_resolved_paths(config: TrainConfig) -> TrainConfig:
    """A copy of ``config`` whose file paths (prompt tables, encode cache, checkpoint,
    reward-server config) are absolute, resolved by :func:`editrl.resources.resolve_path`, so that
    every process of the run reads the same files whatever its working directory."""
    data, policy = config.data, config.policy
    return config.model_copy(update={
        "data": data.model_copy(update={"train_prompts": str(resolve_path(data.train_prompts)),
                                        "heldout_prompts": str(resolve_path(data.heldout_prompts)),
                                        "encode_cache": str(resolve_path(data.encode_cache)) if data.encode_cache else None}),
        "policy": policy.model_copy(update={"checkpoint": str(resolve_path(policy.checkpoint)) if policy.checkpoint else None}),
        "reward_server": config.reward_server.model_copy(update={"config": str(resolve_path(config.reward_server.config))}),
    })


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (the learner's options of other algorithms left out, so
    that it reads back: :meth:`editrl.learner.config.LearnerConfig.foreign_fields`)."""
    data = config.model_dump(mode="json", exclude={"learner": config.learner.foreign_fields()})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
