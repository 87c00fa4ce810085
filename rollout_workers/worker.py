"""The rollout worker: a plain class (driven directly by tests) that samples
groups of trajectories with the current LoRA adapter and gets them scored.

:mod:`editrl.rollout_workers.actor` wraps it as a Ray actor.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from editrl.policy.adapter import PackedAdapter
from editrl.policy.config import PolicyConfig
from editrl.policy.policy import EditPolicy
from editrl.policy.sampling import Trajectories, sample_trajectories
from editrl.protocol.dataset import load_clip
from editrl.protocol.reward import ScoreItem, ScoreRequest, VideoPayload
from editrl.protocol.rollout import Group, GroupFailure, GroupTask, ScoreFailure, trained_positions
from editrl.protocol.video import VideoDecodeError, encode_mp4
from editrl.rollout_workers.encode_cache import EncodeCache, policy_fingerprint
from editrl.rollout_workers.engine import RolloutEngine
from editrl.rollout_workers.reward_client import RewardClient, RewardServerError

logger = logging.getLogger(__name__)

SOURCE_CACHE_SIZE = 64
"""Source clips whose payload and VAE latents a worker keeps (least recently used go first)."""
TEXT_CACHE_SIZE = 1024
"""Instructions whose text embeddings a worker keeps."""


class RolloutWorker:
    """Samples complete groups: encode, denoise G trajectories, decode, score.

    Args:
        worker_id: index used in logs and in returned groups.
        policy_config: the policy to build (must equal the learner's).
        corpus: texts for the tokenizer when the model is built in code.
        root: directory relative checkpoint paths resolve against.
        reward_url: base URL of the reward server.
        reward_timeout_s: per-attempt HTTP timeout (seconds).
        reward_max_attempts: attempts per scoring request.
        torch_threads: CPU threads for torch in this process.
        fps: frame rate written into the mp4s sent for scoring.
        video_format: how videos travel to the reward server: ``mp4`` (H.264,
            small, decoded by the server) or ``raw`` (``uint8`` frames with their
            shape: no encoding here, no decoding there, larger requests; see
            docs/reward_server.md).
        reward_concurrency: scoring requests in flight at once in pipelined mode.
        device: torch device of the policy ("cpu" or "cuda").
        seed: seed of a model built in code (must equal the learner's, so the base
            weights match).
        adapter_wait_s: how long a group waits for the worker's first adapter
            (seconds). Under Ray, ``set_adapter`` runs beside ``submit`` in its own
            concurrency group, so the first group given to a new or restarted worker
            can start before the adapter sent ahead of it has been verified.
        engine: the rollout engine's settings (:class:`RolloutEngine`).
        encode_cache: directory of a precomputed cache of source latents and instruction
            embeddings (``editrl data cache``, :mod:`editrl.rollout_workers.encode_cache`), read
            before encoding; a key it lacks is encoded here (one warning per key, counted in
            :meth:`cache_stats`). None: everything is encoded here.

    Raises:
        ValueError: a setting the device cannot use (:meth:`RolloutEngine.check`); an
            ``encode_cache`` built for another policy (the message names the differing fields)
            or with an unreadable manifest.
        FileNotFoundError: ``encode_cache`` has no manifest.
    """

    def __init__(
        self,
        worker_id: int,
        policy_config: PolicyConfig,
        corpus: list[str],
        root: str,
        reward_url: str,
        reward_timeout_s: float = 120.0,
        reward_max_attempts: int = 5,
        torch_threads: int = 1,
        fps: int = 8,
        reward_concurrency: int = 4,
        device: str = "cpu",
        seed: int = 0,
        video_format: str = "mp4",
        adapter_wait_s: float = 120.0,
        engine: "RolloutEngine | None" = None,
        encode_cache: str | None = None,
    ):
        if video_format not in ("mp4", "raw"):
            raise ValueError(f"video_format must be 'mp4' or 'raw', got {video_format!r}")
        self.engine = (engine or RolloutEngine()).resolved(device)
        self.engine.check(device)
        torch.set_num_threads(torch_threads)
        self.video_format = video_format
        self.worker_id = worker_id
        self.config = policy_config
        self.policy = EditPolicy.from_config(policy_config, corpus, root=root, device=device, seed=seed)
        self.engine.apply(self.policy)
        self.policy_version = -1
        self.fps = fps
        self.client = RewardClient(reward_url, timeout_s=reward_timeout_s, max_attempts=reward_max_attempts)
        self.encode_cache = None if encode_cache is None else EncodeCache(encode_cache, policy_fingerprint(
            policy_config, fps, seed, root, None if policy_config.checkpoint else self.policy.tokenizer.get_vocab()))
        # the VAE and the text encoder are frozen, so encodings never change: least-recently-used caches
        self._source = functools.lru_cache(maxsize=SOURCE_CACHE_SIZE)(self._encode_source)
        self._text = functools.lru_cache(maxsize=TEXT_CACHE_SIZE)(self._encode_text)
        self._null_embeds = self._encode_text("")
        self._scoring = ThreadPoolExecutor(max_workers=reward_concurrency, thread_name_prefix=f"score-{worker_id}")
        self._encoding = (ThreadPoolExecutor(max_workers=self.engine.encode_threads, thread_name_prefix=f"mp4-{worker_id}")
                          if self.engine.encode_threads else None)
        self._done: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._staged: tuple[PackedAdapter | dict[str, torch.Tensor], int] | None = None
        self._adapter_wait_s = adapter_wait_s
        self._adapter_arrived = threading.Event()  # set once the first adapter is staged

    def ready(self) -> int:
        """Returns the worker id once constructed (used to wait for actors)."""
        return self.worker_id

    def set_adapter(self, state: "PackedAdapter | dict[str, torch.Tensor]", policy_version: int, checksum: str) -> int:
        """Verify the learner's adapter now and stage it: it is loaded right before the
        next group is sampled (:meth:`load_staged_adapter`), so a group is always
        sampled with one adapter, and a group queued behind the one being sampled
        starts with the newest adapter that has arrived. A newer call replaces an
        adapter that is staged and not loaded yet.

        Args:
            state: the learner's :meth:`EditPolicy.pack_adapter` (what the runtime
                publishes; under Ray a read-only view of the object store, copied
                straight into the LoRA parameters when loaded) or its ``adapter_state()`` dict.
            policy_version: the version the adapter belongs to; returned.
            checksum: :func:`editrl.policy.policy.adapter_checksum` of the weights as published.

        Raises:
            AdapterMismatchError: wrong keys, shapes, size or checksum; nothing is
                staged, and the loaded (and any staged) adapter stays.
        """
        self.policy.check_adapter_state(state, checksum=checksum)
        with self._lock:
            self._staged = (state, policy_version)
        self._adapter_arrived.set()
        return policy_version

    def load_staged_adapter(self) -> int:
        """Load the staged adapter, if any (call between groups only). Returns the
        policy version now loaded (-1 while none has been set)."""
        with self._lock:
            staged, self._staged = self._staged, None
        if staged is not None:
            self.policy.load_adapter_state(staged[0])  # verified (checksum included) when staged
            self.policy_version = staged[1]
        return self.policy_version

    def _encode_source(self, path: str, start_s: float | None = None, end_s: float | None = None) -> tuple[VideoPayload, torch.Tensor]:
        """The clip's payload for the reward server and its VAE latents ``float32 (1, C, f, h, w)``
        on the policy's device (the VAE encodes with the posterior mode), from the encode cache
        when it holds them (a ``raw`` payload is still decoded from the clip); cached as
        ``self._source``. The clip is sampled at ``self.fps`` over ``[start_s, end_s)`` (:func:`load_clip`)."""
        cached = self.encode_cache.source(path, start_s, end_s) if self.encode_cache is not None else None
        if cached is not None and self.video_format == "mp4":
            return VideoPayload.from_bytes(cached[1]), cached[0].to(self.policy.device)
        frames = load_clip(path, self.config.num_frames, self.config.height, self.config.width, fps=self.fps,
                           start_s=start_s, end_s=end_s)
        latents = cached[0].to(self.policy.device) if cached is not None else self.policy.encode_video(frames[None])
        return self._payload(frames), latents

    def _encode_text(self, instruction: str) -> torch.Tensor:
        """The instruction's embeddings ``float32 (1, L, D)`` on the policy's device, from the
        encode cache when it holds them; cached as ``self._text``."""
        cached = self.encode_cache.text(instruction) if self.encode_cache is not None else None
        if cached is not None:
            return cached.to(self.policy.device)
        with self.engine.text_encoder_on_device(self.policy):
            return self.policy.encode_text([instruction])

    def cache_stats(self) -> dict[str, int]:
        """Lookups in the encode cache: ``{"hits": ..., "misses": ...}`` (both 0 without one)."""
        return self.encode_cache.stats() if self.encode_cache is not None else {"hits": 0, "misses": 0}

    def _payload(self, frames: np.ndarray) -> VideoPayload:
        """``uint8 (F, H, W, 3)`` frames as sent to the reward server (``video_format``)."""
        if self.video_format == "raw":
            return VideoPayload.from_frames(frames)
        return VideoPayload.from_bytes(encode_mp4(frames, fps=self.fps))

    def sample(self, tasks: list[GroupTask]) -> list[Group | GroupFailure]:
        """Sample and score each task's group, one after the other (sequential mode,
        evaluation); a group that cannot be completed comes back as a
        :class:`GroupFailure` with the reason (a :class:`ScoreFailure` when it was
        sampled but not scored), never with made-up rewards."""
        return [self._score(task, *self._sample_or_fail(task)) for task in tasks]

    def submit(self, task: GroupTask) -> str:
        """Sample one group now and score it in the background (pipelined mode): the
        worker is free to sample the next group while this one waits for its
        rewards. Completed groups are fetched with :meth:`collect`. Returns the group id."""
        sampled, error = self._sample_or_fail(task)
        self._scoring.submit(self._score_into_queue, task, sampled, error)
        return task.group_id

    def collect(self, timeout_s: float = 0.0, max_results: int | None = None) -> list[Group | GroupFailure]:
        """Groups whose scoring finished since the last call (at most ``max_results``; the
        others stay for the next call); waits up to ``timeout_s`` seconds for the first one
        when none is ready. Thread-safe."""
        results = []
        try:
            results.append(self._done.get(timeout=timeout_s) if timeout_s > 0 else self._done.get_nowait())
        except queue.Empty:
            return results
        while max_results is None or len(results) < max_results:
            try:
                results.append(self._done.get_nowait())
            except queue.Empty:
                break
        return results

    def pid(self) -> int:
        """The worker's process id (for operators and fault-injection tests)."""
        return os.getpid()

    def _score_into_queue(self, task: GroupTask, sampled: "_Sampled | None", error: str | None) -> None:
        self._done.put(self._score(task, sampled, error))

    def _sample_or_fail(self, task: GroupTask) -> tuple["_Sampled | None", str | None]:
        if self.policy_version < 0 and not self._adapter_arrived.wait(self._adapter_wait_s):
            raise RuntimeError(f"no adapter loaded after {self._adapter_wait_s} s: call set_adapter before sampling")
        self.load_staged_adapter()
        try:
            return self._sample(task), None
        except (VideoDecodeError, ValueError, FileNotFoundError) as exc:
            return None, str(exc)

    def sample_scored_by(self, tasks: list[GroupTask], clients: list[RewardClient]) -> list[list[Group | GroupFailure]]:
        """Sample each task's group once and have every reward server of ``clients`` score the
        same edits (evaluation: the agreement of two reward configs on the same outputs).

        Returns:
            Per client, in order, the tasks' groups (or failures) as :meth:`sample` returns them.
        """
        results: list[list[Group | GroupFailure]] = [[] for _ in clients]
        for task in tasks:
            sampled, error = self._sample_or_fail(task)
            for i, client in enumerate(clients):
                results[i].append(self._score(task, sampled, error, client))
        return results

    def _score(self, task: GroupTask, sampled: "_Sampled | None", error: str | None,
               client: RewardClient | None = None) -> Group | GroupFailure:
        if sampled is not None:
            try:
                return self._scored_group(task, sampled, client or self.client)
            except (ValueError, RewardServerError) as exc:
                logger.error("worker %d: group %s (prompt %s) could not be scored: %s", self.worker_id, task.group_id,
                             task.prompt_id, exc)
                return ScoreFailure(task=task, worker_id=self.worker_id, reason=str(exc))
        logger.error("worker %d: group %s (prompt %s) failed: %s", self.worker_id, task.group_id, task.prompt_id, error)
        return GroupFailure(task=task, worker_id=self.worker_id, reason=str(error))

    def _sample(self, task: GroupTask) -> "_Sampled":
        timings: dict[str, float] = {}
        start = time.perf_counter()
        source_payload, source_latents = self._source(task.video_path, task.start_s, task.end_s)
        text_embeds = self._text(task.instruction)
        timings["encode_s"] = time.perf_counter() - start

        start = time.perf_counter()
        generator = torch.Generator().manual_seed(task.seed)
        window = self.config.sde_window
        spec = self.policy.sampler_spec(seed=task.seed, policy_version=self.policy_version, deterministic=task.deterministic)
        stochastic = any(spec.stochastic)
        trajectories = sample_trajectories(
            self.policy, source_latents, text_embeds, self._null_embeds, task.group_size, spec, generator,
            shared_initial_noise=stochastic and window is not None and window.shared_initial_noise,
            antithetic=self.config.antithetic and stochastic,
            record_means=task.record_means,
            trajectory_dtype=self.engine.torch_trajectory_dtype,
            micro_batch=self.engine.forward_micro_batch,
            # while sampling, only what may travel on: the positions around the requested
            # stochastic steps (a superset of those actually taken) and the edit's
            keep=tuple(sorted({*trained_positions(spec.stochastic), spec.num_steps})),
        )
        timings["sample_s"] = time.perf_counter() - start

        start = time.perf_counter()
        edited = self.policy.decode(trajectories.latent(spec.num_steps))
        timings["decode_s"] = time.perf_counter() - start
        # only what the learner reads travels on, in the trajectory dtype: the latents around the
        # trained steps (a group with none, an evaluation group, keeps its edit's latent; so does a
        # group for a forward-process learner) and the means at the trained steps
        positions = trained_positions(trajectories.spec.stochastic)
        if task.final_latent or not positions:
            positions = tuple(sorted({*positions, trajectories.spec.num_steps}))
        dtype = self.engine.torch_trajectory_dtype if any(trajectories.spec.stochastic) else torch.float32
        trained = tuple(t for t, s in enumerate(trajectories.spec.stochastic) if s)
        means = trajectories.means[:, list(trained)].clone() if trajectories.means is not None else None
        latents = torch.stack([trajectories.latent(p) for p in positions], dim=1).to(dtype)
        trajectories = dataclasses.replace(trajectories, latents=latents, means=means, positions=positions)
        frames = None
        if task.keep_frames:  # the source beside the edit (decoded again: the cache keeps no frames)
            source = load_clip(task.video_path, self.config.num_frames, self.config.height, self.config.width,
                               fps=self.fps, start_s=task.start_s, end_s=task.end_s)
            frames = np.stack([source, edited[0]])
        sampled = _Sampled(self.policy_version, source_payload, source_latents.cpu(), text_embeds.cpu(), trajectories,
                           positions, trained, frames, edited, timings)
        if self._encoding is None:  # encoded on the sampling slot
            sampled.edited = self._encode_edits(sampled)
        return sampled

    def _encode_edits(self, sampled: "_Sampled") -> list[VideoPayload]:
        """Each sample's edit as sent for scoring, encoded by the ``engine.encode_threads`` threads
        (or here, one after the other); adds ``mp4_s`` (seconds) to the timings."""
        if not isinstance(sampled.edited, np.ndarray):
            return sampled.edited
        start = time.perf_counter()
        frames = list(sampled.edited)
        payloads = list(self._encoding.map(self._payload, frames)) if self._encoding is not None else [self._payload(f) for f in frames]
        sampled.timings["mp4_s"] = time.perf_counter() - start
        return payloads

    def _scored_group(self, task: GroupTask, sampled: "_Sampled", client: RewardClient) -> Group:
        sampled.edited = self._encode_edits(sampled)
        start = time.perf_counter()
        items = [
            ScoreItem(item_id=f"{task.group_id}/{i}", instruction=task.instruction, source=sampled.source, edited=edited)
            for i, edited in enumerate(sampled.edited)
        ]
        response = client.score(ScoreRequest(request_id=task.group_id, items=items))
        timings = {**sampled.timings, "reward_s": time.perf_counter() - start}

        failed = [r for r in response.results if not r.ok or r.reward is None or not math.isfinite(r.reward)]
        if failed:
            reasons = "; ".join(f"{r.item_id}: {r.error or 'reward ' + str(r.reward)}" for r in failed[:3])
            raise ValueError(f"{len(failed)} of {task.group_size} items could not be scored ({reasons})")
        dimension_names = sorted({k for r in response.results for k in r.dimensions})
        trajectories = sampled.trajectories
        return Group(
            task=task,
            policy_version=sampled.policy_version,
            worker_id=self.worker_id,
            latents=trajectories.latents,
            log_probs=trajectories.log_probs,
            sampler=trajectories.spec,
            source_latents=sampled.source_latents,
            text_embeds=sampled.text_embeds,
            null_embeds=self._null_embeds.cpu(),
            rewards=torch.tensor([r.reward for r in response.results], dtype=torch.float32),
            reward_dimensions={k: [r.dimensions.get(k) for r in response.results] for k in dimension_names},
            reward_config_version=response.reward_config_version,
            timings=timings,
            frames=sampled.frames,
            means=trajectories.means,
            latent_steps=sampled.latent_steps,
            mean_steps=sampled.mean_steps if trajectories.means is not None else None,
        )


@dataclass
class _Sampled:
    """A sampled, decoded group waiting for its rewards."""

    policy_version: int
    source: VideoPayload
    """The source video as sent for scoring."""
    source_latents: torch.Tensor
    text_embeds: torch.Tensor
    trajectories: Trajectories
    """The group's trajectories, ``latents`` only at ``latent_steps``."""
    latent_steps: tuple[int, ...]
    mean_steps: tuple[int, ...]
    """The trained steps, whose means (when recorded) the group keeps."""
    frames: np.ndarray | None
    edited: "list[VideoPayload] | np.ndarray"
    """Each sample's edited video as sent for scoring, or its ``uint8 (G, F, H, W, 3)`` frames
    until they are encoded (off the sampling slot)."""
    timings: dict[str, float]
