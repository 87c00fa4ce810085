"""Ray actor shell around :class:`editrl.learner.learner.Learner`: the learner runs in
its own process (on a GPU node when asked), so the driver keeps dispatching
rollouts while it trains."""
from __future__ import annotations

import datetime
import logging
import socket
from pathlib import Path

import ray
import torch
import torch.distributed as dist

from editrl.learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from editrl.learner.config import LearnerConfig
from editrl.learner.data_parallel import DataParallel
from editrl.learner.learner import Learner
from editrl.policy.adapter import adapter_checksum
from editrl.policy.config import PolicyConfig
from editrl.policy.policy import EditPolicy
from editrl.protocol.rollout import Group, join_bulk

logger = logging.getLogger(__name__)


class LearnerService:
    """The learner as the driver uses it: update, publish, checkpoint."""

    def __init__(self, policy_config: PolicyConfig, config: LearnerConfig, corpus: list[str], root: str, seed: int, device: str = "cpu",
                 sharding: str = "replicate"):
        """``sharding``: ``replicate`` or ``fsdp`` (``topology.learner.sharding``): an ``fsdp`` rank
        shards the DiT when it joins its peers and reads only its slice of a checkpoint's weights."""
        torch.set_num_threads(config.torch_threads)
        self.sharding = sharding
        torch.manual_seed(seed)
        # the DiT alone: the groups bring their instruction embeddings and source latents; a
        # sharded rank reads only its slice of the checkpoint's weights, once sharded (join)
        policy = EditPolicy.from_config(policy_config, corpus, root=root, device=device, seed=seed, encoders=False,
                                        sliced=sharding == "fsdp")
        self.learner = Learner(policy, config, seed=seed)

    def ready(self) -> int:
        return self.learner.policy_version

    def rendezvous_address(self) -> str:
        """``tcp://<this node's IP>:<a free port>``: where rank 0 serves the process group's store."""
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def join(self, init_method: str, rank: int, world_size: int, timeout_s: float, sequence_parallel: int = 1) -> int:
        """Join the learner ranks' process group (NCCL on CUDA, gloo on CPU) and train data-parallel
        from now on (:mod:`editrl.learner.data_parallel`), with sequences split over groups of
        ``sequence_parallel`` ranks and the DiT sharded with FSDP2 when this rank's ``sharding``
        is ``fsdp``; a collective that waits longer than ``timeout_s`` (a
        rank died) raises. Returns ``rank``."""
        backend = "nccl" if self.learner.policy.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        self.learner.data_parallel = DataParallel.from_default_group(sequence_parallel)
        if sequence_parallel > 1:
            self.learner.split_sequences()
        if self.sharding == "fsdp":
            self.learner.shard()
        return rank

    def train_step(self, groups: list[Group]) -> dict:
        """One update; see :meth:`editrl.learner.learner.Learner.train_step`.

        Groups whose tensors are in the object store (``bulk``, returned there by the rollout
        workers) are read from it here, without a copy on this node (``data_bytes_read``). A group
        whose tensors are gone (the node holding them died) is left out on every rank alike,
        logged, and listed in ``lost_group_ids`` (``groups_lost`` counts them; the driver re-issues
        them); when every group is lost there is no update and ``updated`` is 0.
        """
        groups, lost, read = fetch_bulk(groups)
        if dist.is_initialized():  # every rank leaves out what any rank lost
            everyone: list = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, lost)
            lost = sorted(set().union(*everyone))
        kept = [g for g in groups if g.task.group_id not in lost]
        if lost:
            logger.error("train_step: the tensors of %d groups are gone from the object store; left out: %s",
                         len(lost), ", ".join(lost))
        info = {"data_bytes_read": float(read), "groups_lost": float(len(lost)), "lost_group_ids": lost}
        if not kept:
            return {**info, "updated": 0.0}
        return {**self.learner.train_step(kept), **info, "updated": 1.0}

    def publish(self) -> list | None:
        """``[ref, policy_version, checksum]``: the adapter weights packed into one
        flat fp32 buffer (:class:`editrl.policy.policy.PackedAdapter`) and put in the object
        store once by the learner itself (they travel learner -> workers, not through
        the driver; Ray ships the buffer without pickling tensors), with the version
        and the checksum the workers verify (computed once, here). Every rank of a sharded
        learner calls it (the adapter is gathered); ranks other than 0 return None."""
        packed = self.learner.policy.pack_adapter()
        if not self.learner.is_rank_zero:
            return None
        return [ray.put(packed), self.learner.policy_version, adapter_checksum(packed)]

    def save_checkpoint(self, run_dir: str, step: int, driver_state: dict) -> str:
        return str(save_checkpoint(Path(run_dir), step, self.learner, driver_state))

    def resume(self, run_dir: str) -> dict | None:
        """Load the newest checkpoint of ``run_dir``; returns its driver state, or None."""
        path = latest_checkpoint(Path(run_dir))
        return None if path is None else load_checkpoint(path, self.learner)

    def save_adapter(self, directory: str) -> str:
        return str(self.learner.save_adapter(directory))


def fetch_bulk(groups: list[Group]) -> tuple[list[Group], list[str], int]:
    """The groups with their tensors (those in the object store read from it), the ids of the
    groups whose tensors are lost, and the bytes read."""
    out, lost, read = [], [], 0
    for group in groups:
        if group.bulk is None:
            out.append(group)
            continue
        try:
            arrays = ray.get(group.bulk)
        except ray.exceptions.ObjectLostError:  # the node holding it (or the driver, its owner) died
            lost.append(group.task.group_id)
            continue
        out.append(join_bulk(group, arrays))
        read += group.bulk_bytes
    return out, lost, read


def make_learner_actor(num_cpus: float = 1.0, num_gpus: float = 0.0, resources: dict[str, float] | None = None):
    """:class:`LearnerService` as a Ray actor class with the given resources."""
    return ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None)(LearnerService)
