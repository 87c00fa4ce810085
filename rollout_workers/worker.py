"""The rollout worker: a plain class (driven directly by tests) that samples
groups of trajectories with the current LoRA adapter and gets them scored.

:mod:`rollout_workers.actor` wraps it as a Ray actor.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from editrl.data.dataset import load_clip
from policy.config import PolicyConfig
from policy.policy import EditPolicy
from policy.sampling import sample_trajectories
from protocol.reward import ScoreItem, ScoreRequest, VideoPayload
from protocol.rollout import Group, GroupFailure, GroupTask
from protocol.video import VideoDecodeError, encode_mp4
from rollout_workers.reward_client import RewardClient, RewardServerError

logger = logging.getLogger(__name__)


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
    ):
        torch.set_num_threads(torch_threads)
        self.worker_id = worker_id
        self.config = policy_config
        self.policy = EditPolicy.from_config(policy_config, corpus, root=root)
        self.policy_version = -1
        self.fps = fps
        self.client = RewardClient(reward_url, timeout_s=reward_timeout_s, max_attempts=reward_max_attempts)
        self._sources: dict[str, tuple[np.ndarray, bytes]] = {}
        self._null_embeds = self.policy.encode_text([""])

    def ready(self) -> int:
        """Returns the worker id once constructed (used to wait for actors)."""
        return self.worker_id

    def set_adapter(self, state: dict[str, torch.Tensor], policy_version: int, checksum: str) -> int:
        """Load the learner's adapter (between groups only: calls are serialised).

        Raises:
            AdapterMismatchError: wrong modules or checksum.
        """
        self.policy.load_adapter_state(state, checksum=checksum)
        self.policy_version = policy_version
        return policy_version

    def _source(self, path: str) -> tuple[np.ndarray, bytes]:
        if path not in self._sources:
            frames = load_clip(path, self.config.num_frames, self.config.height, self.config.width)
            self._sources[path] = (frames, encode_mp4(frames, fps=self.fps))
        return self._sources[path]

    def sample(self, tasks: list[GroupTask]) -> list[Group | GroupFailure]:
        """Sample and score each task's group; a group that cannot be completed comes
        back as a :class:`GroupFailure` with the reason (never with made-up rewards)."""
        results: list[Group | GroupFailure] = []
        for task in tasks:
            try:
                results.append(self._sample_group(task))
            except (VideoDecodeError, ValueError, FileNotFoundError, RewardServerError) as exc:
                logger.error("worker %d: group %s (prompt %s) failed: %s", self.worker_id, task.group_id, task.prompt_id, exc)
                results.append(GroupFailure(task=task, worker_id=self.worker_id, reason=str(exc)))
        return results

    def _sample_group(self, task: GroupTask) -> Group:
        if self.policy_version < 0:
            raise RuntimeError("no adapter loaded: call set_adapter before sampling")
        timings: dict[str, float] = {}
        start = time.perf_counter()
        frames, source_mp4 = self._source(task.video_path)
        source_latents = self.policy.encode_video(frames[None])
        text_embeds = self.policy.encode_text([task.instruction])
        timings["encode_s"] = time.perf_counter() - start

        start = time.perf_counter()
        generator = torch.Generator().manual_seed(task.seed)
        window = self.config.sde_window
        if task.eta > 0:
            sde_mask = self.policy.sde_steps(seed=task.seed, policy_version=self.policy_version)
        else:
            sde_mask = [False] * self.config.num_steps
        trajectories = sample_trajectories(
            self.policy, source_latents, text_embeds, self._null_embeds, task.group_size,
            self.policy.sigmas(), sde_mask, task.eta, self.config.guidance_scale, generator,
            sampler=self.config.sampler, shared_initial_noise=window is not None and window.shared_initial_noise,
            record_means=task.record_means,
        )
        timings["sample_s"] = time.perf_counter() - start

        start = time.perf_counter()
        edited = self.policy.decode(trajectories.latents[:, -1])
        timings["decode_s"] = time.perf_counter() - start

        start = time.perf_counter()
        source_payload = VideoPayload.from_bytes(source_mp4)
        items = [
            ScoreItem(
                item_id=f"{task.group_id}/{i}",
                instruction=task.instruction,
                source=source_payload,
                edited=VideoPayload.from_bytes(encode_mp4(edited[i], fps=self.fps)),
            )
            for i in range(task.group_size)
        ]
        response = self.client.score(ScoreRequest(request_id=task.group_id, items=items))
        timings["reward_s"] = time.perf_counter() - start

        failed = [r for r in response.results if not r.ok or r.reward is None or not math.isfinite(r.reward)]
        if failed:
            reasons = "; ".join(f"{r.item_id}: {r.error or 'reward ' + str(r.reward)}" for r in failed[:3])
            raise ValueError(f"{len(failed)} of {task.group_size} items could not be scored ({reasons})")
        dimension_names = sorted({k for r in response.results for k in r.dimensions})
        return Group(
            task=task,
            policy_version=self.policy_version,
            worker_id=self.worker_id,
            latents=trajectories.latents,
            log_probs=trajectories.log_probs,
            sigmas=trajectories.sigmas,
            sde_mask=trajectories.sde_mask,
            source_latents=source_latents.cpu(),
            text_embeds=text_embeds.cpu(),
            null_embeds=self._null_embeds.cpu(),
            rewards=torch.tensor([r.reward for r in response.results], dtype=torch.float32),
            reward_dimensions={k: [r.dimensions.get(k) for r in response.results] for k in dimension_names},
            reward_config_version=response.reward_config_version,
            timings=timings,
            frames=edited if task.keep_frames else None,
            means=trajectories.means,
        )
