"""Checks ``editrl train`` makes before torch or Ray is imported or any process starts.

Everything that can be known from the config and the file system is checked here:
the video geometry against the model's spatial and temporal factors and patch size
(read from a checkpoint's ``config.json`` files, without diffusers), the checkpoint
and data paths, the run directory and, when ``reward_server.url`` is set, whether a
reward server answers there. Each failure is a :class:`PreflightError` whose message
is one line naming the field, file or URL. This module imports only the standard
library and the torch-free config modules.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import struct
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from editrl.cluster.config import TrainConfig
from editrl.protocol.answers import first_line
from editrl.policy.architectures import published_architecture
from editrl.policy.config import PolicyConfig
from editrl.policy.geometry import check_geometry as check_clip_geometry
from editrl.cluster.checkpoint_kind import CheckpointKindError, check_learner_layout, checkpoint_widened
from editrl.policy.geometry import vae_scale_factors
from editrl.resources import resolve_path

logger = logging.getLogger(__name__)

RUN_OUTPUTS = ("config.yaml", "train.log", "reward_server.log", "metrics.jsonl", "summary.json", "reward_curves.png", "contact_sheet.png",
               "rollouts", "samples", "tensorboard", "checkpoints", "adapter")
"""What a run writes into its directory; ``--overwrite`` removes exactly these."""
STARTING_STATUSES = (502, 503, 504)
"""HTTP answers of a reward server (or of the proxy in front of it) that is still starting: waited for."""


class PreflightError(ValueError):
    """A config, path or reward URL that cannot work; the message is one line naming it."""


@dataclass(frozen=True)
class ModelFactors:
    """Pixels per latent cell (``spatial``), frames per latent frame after the first
    (``temporal``) and the DiT's ``(frames, height, width)`` patch size."""

    spatial: int
    temporal: int
    patch: tuple[int, int, int]
    source: str

    def latent_size(self, policy: PolicyConfig) -> tuple[int, int, int]:
        """``(f, h, w)`` of a clip's latent: ``1 + (F - 1) / temporal`` frames, ``H / spatial`` by ``W / spatial`` cells."""
        return 1 + (policy.num_frames - 1) // self.temporal, policy.height // self.spatial, policy.width // self.spatial

    def tokens(self, policy: PolicyConfig) -> int:
        """Tokens per sequence: the latent cells over the DiT's patch size."""
        (f, h, w), (pt, ph, pw) = self.latent_size(policy), self.patch
        return (f // pt) * (h // ph) * (w // pw)


def model_factors(policy: PolicyConfig) -> ModelFactors:
    """The factors of the model ``policy`` names: ``spatial`` and ``temporal`` by
    :func:`editrl.policy.geometry.vae_scale_factors` (the VAE config's ``scale_factor_spatial`` /
    ``scale_factor_temporal``, else ``2 ** len(temperal_downsample)`` / ``2 ** sum(...)``), the
    patch from the transformer config. The tiny model built in code (no checkpoint): spatial
    ``2 ** (len(vae_dim_mult) - 1)``, temporal ``2 ** sum(vae_temporal_downsample)``, patch ``(1, 2, 2)``.
    A ``policy.checkpoint`` that is not on disk but is named like a published checkpoint
    (:func:`editrl.policy.architectures.published_architecture`) uses its published configs.

    Raises:
        PreflightError: ``policy.checkpoint`` is missing (and not a published name), not a
            diffusers model directory, or its ``vae/`` or ``transformer/`` config cannot be read.
    """
    if policy.checkpoint is None:
        tiny = policy.tiny
        return ModelFactors(2 ** (len(tiny.vae_dim_mult) - 1), 2 ** sum(tiny.vae_temporal_downsample), (1, 2, 2),
                            "the tiny model (policy.tiny)")
    published = published_architecture(policy.checkpoint)
    if published is not None and not resolve_path(policy.checkpoint).exists():
        vae, transformer = published["vae"], published["transformer"]
        source = f"the published config of {policy.checkpoint.rstrip('/').rsplit('/', 1)[-1]}"
    else:
        path = checkpoint_dir(policy.checkpoint)
        vae, transformer = _read_json(path / "vae" / "config.json"), _read_json(path / "transformer" / "config.json")
        source = f"checkpoint {path.name}"
    try:
        spatial, temporal = vae_scale_factors(vae)
        patch = tuple(int(p) for p in transformer.get("patch_size") or (1, 2, 2))
    except (KeyError, TypeError, ValueError) as exc:
        raise PreflightError(f"policy.checkpoint={policy.checkpoint}: unexpected vae/transformer config ({exc})") from None
    if len(patch) != 3:
        raise PreflightError(f"policy.checkpoint={policy.checkpoint}: transformer patch_size {list(patch)} is not (frames, height, width)")
    return ModelFactors(spatial, temporal, patch, source)  # type: ignore[arg-type]


def checkpoint_dir(checkpoint: str) -> Path:
    """The resolved ``policy.checkpoint`` directory.

    Raises:
        PreflightError: it does not exist, is not a directory, or lacks a model folder.
    """
    path = resolve_path(checkpoint)
    if not path.exists():
        raise PreflightError(f"policy.checkpoint={checkpoint}: no such directory ({path})")
    if not path.is_dir():
        raise PreflightError(f"policy.checkpoint={checkpoint}: not a directory ({path})")
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / sub).is_dir():
            raise PreflightError(f"policy.checkpoint={checkpoint}: not a diffusers model directory, no {sub}/ folder in {path}")
    return path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PreflightError(f"{path}: cannot read the model config ({type(exc).__name__}: {exc})") from None


def check_geometry(policy: PolicyConfig, factors: ModelFactors | None = None) -> None:
    """``policy.height`` and ``policy.width`` are multiples of ``spatial * patch``;
    ``policy.num_frames`` is ``temporal * pt * k + 1`` (:func:`editrl.policy.geometry.check_geometry`).

    Raises:
        PreflightError: naming the field, the rule and the nearest valid values.
    """
    f = factors or model_factors(policy)
    pt, ph, pw = f.patch
    try:
        check_clip_geometry(policy.height, policy.width, policy.num_frames, f.spatial, f.temporal, (ph, pw),
                            temporal_patch=pt, source=f.source, field_prefix="policy.")
    except ValueError as exc:
        raise PreflightError(str(exc)) from None


def check_sequence_parallel(config: TrainConfig, factors: ModelFactors | None = None) -> None:
    """``topology.learner.sequence_parallel`` k splits every sequence's tokens and the attention heads
    k ways: k must divide both, and the model kind must have diffusers' context-parallel plan.

    Raises:
        PreflightError: naming the field, the numbers and the nearest degrees that work.
    """
    k, policy, ranks = config.topology.learner.sequence_parallel, config.policy, config.topology.learner.ranks
    if k == 1:
        return
    if policy.kind == "vace":
        raise PreflightError(f"topology.learner.sequence_parallel={k}: policy.kind=vace has no context-parallel plan in diffusers; use 1")
    tokens = (factors or model_factors(policy)).tokens(policy)
    if policy.checkpoint is None:
        heads = policy.tiny.dit_heads
    else:
        heads = int(_read_json(checkpoint_dir(policy.checkpoint) / "transformer" / "config.json").get("num_attention_heads", 0))
    for what, count in ((f"{tokens} tokens per sequence", tokens), (f"{heads} attention heads of the DiT", heads)):
        if count % k:
            works = [d for d in range(1, ranks + 1) if ranks % d == 0 and tokens % d == 0 and heads % d == 0]
            raise PreflightError(f"topology.learner.sequence_parallel={k} must divide the {what}; degrees that work with "
                                 f"topology.learner.ranks={ranks}: {works}")


def check_paths(config: TrainConfig) -> None:
    """The prompt tables and (when the run starts its own) the reward-server config exist.

    Raises:
        PreflightError: naming the field and the path looked up.
    """
    fields = [("data.train_prompts", config.data.train_prompts), ("data.heldout_prompts", config.data.heldout_prompts)]
    if config.reward_server.url is None:
        fields.append(("reward_server.config", config.reward_server.config))
    for field, value in fields:
        path = resolve_path(value)
        if not path.exists():
            raise PreflightError(f"{field}={value}: no such file or directory ({path})")


def latest_checkpoint_name(run_dir: Path) -> str | None:
    """The name of the newest complete checkpoint of ``run_dir`` (``checkpoints/latest``), or None."""
    pointer = run_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    return name if name and (run_dir / "checkpoints" / name).is_dir() else None


def check_resume_dir(run_dir: Path) -> None:
    """``--resume RUN_DIR``: the directory holds a run's ``config.yaml`` and a complete checkpoint.

    Raises:
        PreflightError: naming the directory and what is missing.
    """
    if not run_dir.is_dir():
        raise PreflightError(f"--resume {run_dir}: no such run directory")
    if not (run_dir / "config.yaml").is_file():
        raise PreflightError(f"--resume {run_dir}: no config.yaml there, so no run to continue")
    if latest_checkpoint_name(run_dir) is None:
        raise PreflightError(f"--resume {run_dir}: no checkpoint in {run_dir / 'checkpoints'} (a run writes one every "
                             "runtime.checkpoint_every steps, at the end and when interrupted after a finished step)")


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of a ``.safetensors`` file, from its JSON header (no torch).

    Raises:
        PreflightError: the file is missing or its header is not a safetensors header.
    """
    try:
        with path.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(min(length, 100 * 2**20)))
        return {name: list(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise PreflightError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None


LORA_KEY = re.compile(r".*\.attn([12])\.(.+)\.lora_A\.weight$")


def check_resume_checkpoint(config: TrainConfig, run_dir: Path) -> None:
    """``--resume``: the newest checkpoint fits the config it is resumed with: written by as many
    learner ranks as ``topology.learner.ranks`` (the data split, and with it every update's float sums,
    follows the rank count), and its adapter has ``policy.lora``'s rank, attentions and projections.

    Raises:
        PreflightError: naming the checkpoint, what it holds and what the config asks.
    """
    name = latest_checkpoint_name(run_dir)
    path = run_dir / "checkpoints" / str(name)
    driver = _read_json(path / "driver.json")
    saved_ranks, ranks = driver.get("learner_ranks"), config.topology.learner.ranks
    if saved_ranks is not None and saved_ranks != ranks:
        raise PreflightError(f"--resume {run_dir}: checkpoint {name} was written by {saved_ranks} learner ranks, the config "
                             f"asks topology.learner.ranks={ranks}; resume with --set topology.learner.ranks={saved_ranks}")
    saved_sharding, sharding = driver.get("learner_sharding", "replicate"), config.topology.learner.sharding
    if saved_sharding != sharding:
        raise PreflightError(f"--resume {run_dir}: checkpoint {name} was written with topology.learner.sharding={saved_sharding}, the "
                             f"config asks {sharding}; resume with --set topology.learner.sharding={saved_sharding}")
    lora = config.policy.lora
    shapes = {key: shape for key, shape in safetensors_shapes(path / "adapter_model.safetensors").items() if LORA_KEY.match(key)}
    saved_rank = sorted({shape[0] for shape in shapes.values()})
    if saved_rank != [lora.rank]:
        raise PreflightError(f"--resume {run_dir}: the adapter of checkpoint {name} has LoRA rank {saved_rank}, the config "
                             f"asks policy.lora.rank={lora.rank}")
    saved = sorted({(LORA_KEY.match(k).group(1), LORA_KEY.match(k).group(2)) for k in shapes})
    wanted = sorted({({"self": "1", "cross": "2"}[a], t) for a in lora.attention for t in lora.target_modules})
    if saved != wanted:
        def names(pairs):
            return ", ".join(f"attn{a}.{t}" for a, t in pairs)
        raise PreflightError(f"--resume {run_dir}: the adapter of checkpoint {name} adapts {names(saved)}; the config "
                             f"(policy.lora.attention, target_modules) asks {names(wanted)}")


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A new run may write into ``run_dir``: it is absent or empty, or ``overwrite`` removes
    the old run's outputs (:data:`RUN_OUTPUTS`) so that nothing is appended to them.

    Raises:
        PreflightError: ``run_dir`` is a file, or is not empty and ``overwrite`` is False.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise PreflightError(f"--run-dir {run_dir}: exists and is not a directory")
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if not entries:
        return
    if not overwrite:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise PreflightError(f"--run-dir {run_dir} is not empty ({shown}); continue that run with --resume {run_dir}, "
                             "or pass --overwrite to replace it")
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    left = sorted(p.name for p in run_dir.iterdir())
    if left:
        logger.warning("--overwrite: kept files in %s that a run does not write: %s", run_dir, ", ".join(left[:10]))


def check_reward_url(url: str, timeout_s: float, poll_interval_s: float = 0.5) -> None:
    """Wait until ``GET url/healthz`` answers ``{"status": "ok"}``; a definite answer fails at once.

    A refused connection, an unknown host, a non-http URL and any HTTP answer other than
    200 or 502/503/504 are answers. Timeouts, resets and 502/503/504 mean the server is
    still starting: those are waited for (logged once) up to ``timeout_s`` seconds.

    Raises:
        PreflightError: naming the URL and what it said.
    """
    if not url.startswith(("http://", "https://")):
        raise PreflightError(f"reward_server.url={url}: not an http:// or https:// URL")
    health = url.rstrip("/") + "/healthz"
    deadline = time.monotonic() + timeout_s
    said_waiting = False
    while True:
        answer, starting = _probe(health, timeout=min(2.0, max(0.1, timeout_s)))
        if answer is None:
            return
        if not starting:
            raise PreflightError(f"reward_server.url={url}: GET {health} {answer}")
        if time.monotonic() >= deadline:
            raise PreflightError(f"reward_server.url={url}: not ready after {timeout_s:.0f} s (reward_server.startup_timeout_s); "
                                 f"GET {health} {answer}")
        if not said_waiting:
            logger.warning("reward server %s is not ready (%s); waiting up to %.0f s for it to start", url, answer, timeout_s)
            said_waiting = True
        time.sleep(poll_interval_s)


def _probe(health: str, timeout: float) -> tuple[str | None, bool]:
    """``(None, _)`` when healthy, else ``(what it said, whether that means still starting)``."""
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:  # noqa: S310 - http(s) checked above
            body = response.read(2000)
    except urllib.error.HTTPError as exc:
        return f"answered HTTP {exc.code}: {first_line(exc.read(2000))}", exc.code in STARTING_STATUSES
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            return "failed: connection refused (nothing listens there)", False
        if isinstance(reason, socket.gaierror):
            return f"failed: unknown host ({reason})", False
        return f"failed: {reason}", True
    except (TimeoutError, ConnectionError, OSError) as exc:
        return f"failed: {type(exc).__name__}: {exc}", True
    try:
        if json.loads(body) == {"status": "ok"}:
            return None, False
    except ValueError:
        pass
    return f"answered HTTP 200 but not {{\"status\": \"ok\"}}: {first_line(body)}", False


def preflight(config: TrainConfig, run_dir: Path, resume: bool = False, overwrite: bool = False) -> None:
    """Every check of this module, cheapest first; the run directory is cleared (``overwrite``)
    only once all others passed. ``resume`` assumes :func:`check_resume_dir` passed.

    Raises:
        PreflightError: the first problem found (one line).
    """
    if config.policy.checkpoint is not None:
        try:
            path = checkpoint_dir(config.policy.checkpoint)
            checkpoint_widened(config.policy, path)
            learner = config.topology.learner
            check_learner_layout(path, learner.sharding, learner.sequence_parallel)
        except CheckpointKindError as exc:
            raise PreflightError(str(exc)) from None
    check_geometry(config.policy)
    check_sequence_parallel(config)
    check_paths(config)
    if config.reward_server.url:
        check_reward_url(config.reward_server.url, config.reward_server.startup_timeout_s)
    if resume:
        check_resume_checkpoint(config, run_dir)
    else:
        prepare_run_dir(run_dir, overwrite)
