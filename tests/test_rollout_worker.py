"""The rollout worker driven directly (no Ray): a complete scored group against
the real reward server process, and each way a group can fail."""
import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, structured_clip, tiny_policy_config
from standins import http_standin

from editrl.cluster.reward_process import RewardServerProcess, free_port
from editrl.policy.adapter import adapter_checksum
from editrl.policy.config import SdeWindowSettings
from editrl.protocol.rollout import Group, GroupFailure, GroupTask
from editrl.protocol.video import encode_mp4
from editrl.rollout_workers.worker import RolloutWorker

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reward_url(tmp_path_factory):
    with RewardServerProcess(ROOT / "configs/reward_server.yaml", tmp_path_factory.mktemp("rs") / "server.log", 60) as url:
        yield url


@pytest.fixture
def clip_path(tmp_path):
    path = tmp_path / "clip.mp4"
    path.write_bytes(encode_mp4(structured_clip(9, 48)))
    return str(path)


def _worker(url: str) -> RolloutWorker:
    worker = RolloutWorker(0, tiny_policy_config(), CORPUS, str(ROOT), url, reward_timeout_s=10, reward_max_attempts=2)
    state = worker.policy.adapter_state()
    worker.set_adapter(state, 0, adapter_checksum(state))
    return worker


def _task(path: str, group_id: str = "s1-g0", instruction: str = CORPUS[0]) -> GroupTask:
    return GroupTask(group_id, "p0", instruction, path, seed=5, group_size=3)


def test_worker_returns_a_complete_scored_group(reward_url, clip_path):
    worker = _worker(reward_url)
    [group] = worker.sample([_task(clip_path)])
    assert isinstance(group, Group)
    assert group.policy_version == 0 and group.rewards.shape == (3,)
    assert all(0.0 <= r <= 10.0 for r in group.rewards.tolist())
    assert set(group.reward_dimensions) >= {"instruction_following", "preservation", "temporal_consistency"}
    # "make the video brighter" is a checkable edit: every sample has an instruction score
    assert all(v is not None for v in group.reward_dimensions["instruction_following"])
    assert group.reward_config_version
    # steps 0-2 of 4 trained: the group carries the latents before and after each, positions 0..3 of 0..4
    assert group.latent_steps == (0, 1, 2, 3) and group.latents.shape[:2] == (3, 4)
    assert torch.isfinite(group.log_probs[:, :3]).all()
    assert {"encode_s", "sample_s", "decode_s", "reward_s"} <= set(group.timings)


def test_worker_sends_raw_frames_and_loads_a_packed_adapter(reward_url, clip_path):
    raw = RolloutWorker(0, tiny_policy_config(), CORPUS, str(ROOT), reward_url, reward_timeout_s=10, video_format="raw")
    packed = raw.policy.pack_adapter()
    raw.set_adapter(packed, 0, adapter_checksum(packed))
    [group] = raw.sample([_task(clip_path)])
    assert isinstance(group, Group) and group.rewards.shape == (3,)
    assert all(0.0 <= r <= 10.0 for r in group.rewards.tolist())
    # same seed, same frames on the wire, same rewards
    [again] = raw.sample([_task(clip_path, group_id="s1-g0-again")])
    assert torch.equal(group.rewards, again.rewards)
    with pytest.raises(ValueError, match="video_format"):
        RolloutWorker(0, tiny_policy_config(), CORPUS, str(ROOT), reward_url, video_format="gif")


def test_worker_refuses_to_sample_without_an_adapter(reward_url, clip_path):
    worker = RolloutWorker(0, tiny_policy_config(), CORPUS, str(ROOT), reward_url, adapter_wait_s=0.3)
    with pytest.raises(RuntimeError, match="no adapter loaded after 0.3 s"):
        worker.sample([_task(clip_path)])


def test_first_group_waits_for_an_adapter_that_arrives_after_it(reward_url, clip_path):
    # under Ray, set_adapter runs beside submit: a new worker's first group can start
    # before the adapter sent ahead of it is verified and staged
    worker = RolloutWorker(0, tiny_policy_config(), CORPUS, str(ROOT), reward_url, reward_timeout_s=10)
    state = worker.policy.adapter_state()
    late = threading.Timer(0.5, worker.set_adapter, (state, 3, adapter_checksum(state)))
    late.start()
    try:
        [group] = worker.sample([_task(clip_path)])
    finally:
        late.join()
    assert isinstance(group, Group) and group.policy_version == 3


def test_undecodable_clip_fails_the_group_naming_the_file(reward_url, tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all")
    [result] = _worker(reward_url).sample([_task(str(bad))])
    assert isinstance(result, GroupFailure) and "broken.mp4" in result.reason


def test_reward_server_down_fails_the_group_naming_the_url(clip_path):
    url = f"http://127.0.0.1:{free_port()}"
    [result] = _worker(url).sample([_task(clip_path)])
    assert isinstance(result, GroupFailure) and url in result.reason


@contextlib.contextmanager
def nan_reward_server():
    """An HTTP peer that answers every score request with a NaN reward for the first item."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            results = [
                {"item_id": item["item_id"], "ok": True, "reward": float("nan") if i == 0 else 5.0, "dimensions": {}}
                for i, item in enumerate(request["items"])
            ]
            body = json.dumps({"request_id": request["request_id"], "reward_config_version": "v", "results": results}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with http_standin(Handler) as url:
        yield url


def test_nan_reward_fails_the_group_naming_the_item(clip_path):
    with nan_reward_server() as url:
        [result] = _worker(url).sample([_task(clip_path, group_id="s2-g1")])
    assert isinstance(result, GroupFailure)
    assert "s2-g1/0" in result.reason and "1 of 3" in result.reason


def test_worker_samples_the_configured_window_and_records_means(reward_url, clip_path):
    config = tiny_policy_config(sde_window=SdeWindowSettings(size=1, position="random"))
    worker = RolloutWorker(0, config, CORPUS, str(ROOT), reward_url, reward_timeout_s=10, reward_max_attempts=2)
    state = worker.policy.adapter_state()
    worker.set_adapter(state, 0, adapter_checksum(state))
    task = GroupTask("s3-g0", "p0", CORPUS[0], clip_path, seed=11, group_size=3, record_means=True)
    [group] = worker.sample([task])
    expected = worker.policy.sde_steps(seed=11, policy_version=0)
    assert group.sde_mask.tolist() == expected and sum(expected) == 1
    # the group shares its initial noise and ODE prefix up to the window, then branches
    first = expected.index(True)
    assert group.latent_steps == (first, first + 1)  # only the trained step's two latents travel
    for t in group.latent_steps:
        assert all(torch.equal(group.latent(t)[0], group.latent(t)[i]) for i in (1, 2)) == (t <= first)
    # the means only at the trained step; the step before it (deterministic) is not kept
    assert group.means.shape[:2] == (3, 1) and group.mean_steps == (first,)
    assert group.mean(first).shape == group.latent(first).shape
    with pytest.raises(KeyError, match="s3-g0"):
        group.mean(first - 1 if first else first + 1)


def test_evaluation_groups_do_not_share_noise_under_a_shared_noise_window(reward_url, clip_path):
    from editrl.policy.config import SdeWindowSettings

    config = tiny_policy_config(sde_window=SdeWindowSettings(size=1, position="fixed", start=0, shared_initial_noise=True))
    worker = RolloutWorker(0, config, CORPUS, str(ROOT), reward_url, reward_timeout_s=10)
    state = worker.policy.adapter_state()
    worker.set_adapter(state, 0, adapter_checksum(state))
    [train_group] = worker.sample([_task(clip_path)])
    [eval_group] = worker.sample([GroupTask("eval-0", "p0", CORPUS[0], clip_path, seed=5, group_size=3, deterministic=True)])
    # training samples share the initial noise; deterministic evaluation samples must not
    assert train_group.latent_steps == (0, 1) and torch.equal(train_group.latent(0)[0], train_group.latent(0)[1])
    assert eval_group.latent_steps == (4,)  # an evaluation group keeps only its edit's latent
    assert not torch.equal(eval_group.latent(4)[0], eval_group.latent(4)[1])


def test_a_group_for_a_forward_process_learner_carries_the_edits_latent(reward_url, clip_path):
    worker = _worker(reward_url)
    task = GroupTask("s4-g0", "p0", CORPUS[0], clip_path, seed=5, group_size=3, final_latent=True)
    [group] = worker.sample([task])
    # the trained steps 0-2 and their successors (0..3), and the edit's latent at T = 4
    assert group.latent_steps == (0, 1, 2, 3, 4)
    frames = worker.policy.decode(group.latent(4))
    assert frames.shape == (3, 5, 32, 32, 3)


def _shifted(state: dict[str, torch.Tensor], delta: float) -> dict[str, torch.Tensor]:
    return {k: v + delta for k, v in state.items()}


def test_a_new_adapter_is_staged_and_loaded_before_the_next_group(reward_url, clip_path):
    from editrl.policy.adapter import AdapterMismatchError

    worker = _worker(reward_url)
    [first] = worker.sample([_task(clip_path)])
    v1 = _shifted(worker.policy.adapter_state(), 0.01)
    assert worker.set_adapter(v1, 1, adapter_checksum(v1)) == 1
    # staged only: the loaded weights and version are those of version 0 until a group starts
    assert worker.policy_version == 0
    assert not torch.equal(worker.policy.adapter_state()[next(iter(v1))], v1[next(iter(v1))])
    # a newer adapter replaces the staged one; a rejected one changes nothing
    v2 = _shifted(v1, 0.01)
    worker.set_adapter(v2, 2, adapter_checksum(v2))
    with pytest.raises(AdapterMismatchError, match="checksum"):
        worker.set_adapter(_shifted(v2, 1.0), 3, adapter_checksum(v2))
    [second] = worker.sample([_task(clip_path, group_id="s1-g1")])
    assert first.policy_version == 0 and second.policy_version == 2 and worker.policy_version == 2
    assert all(torch.equal(worker.policy.adapter_state()[k], v2[k]) for k in v2)
    assert worker.load_staged_adapter() == 2  # nothing staged any more: stays at version 2


def test_a_group_queued_behind_the_sampling_one_starts_with_the_newest_adapter(ray_session, reward_url, clip_path):
    from editrl.policy.policy import EditPolicy
    from editrl.rollout_workers.actor import make_rollout_actor

    ray = ray_session
    config = tiny_policy_config(num_steps=40)  # group A samples for about a second: time for the staging call
    worker = make_rollout_actor(num_cpus=0).remote(0, config, CORPUS, str(ROOT), reward_url, reward_timeout_s=30)
    assert ray.get(worker.load_staged_adapter.remote()) == -1  # nothing set yet
    adapter = EditPolicy.from_config(config, CORPUS, root=str(ROOT)).adapter_state()
    ray.get(worker.set_adapter.remote(adapter, 0, adapter_checksum(adapter)))
    # group A starts sampling with version 0 and group B waits behind it in the one-at-a-time
    # compute group; version 1 is staged while A samples (staging does not wait for compute)
    worker.submit.remote(GroupTask("a", "p0", CORPUS[0], clip_path, seed=1, group_size=8))
    worker.submit.remote(GroupTask("b", "p0", CORPUS[0], clip_path, seed=2, group_size=8))
    v1 = _shifted(adapter, 0.01)
    assert ray.get(worker.set_adapter.remote(v1, 1, adapter_checksum(v1))) == 1
    groups = []
    deadline = time.monotonic() + 120
    while len(groups) < 2:
        assert time.monotonic() < deadline, f"groups a and b did not both come back within 120 s (got {len(groups)})"
        refs = worker.collect.options(num_returns=3).remote(5.0, 2)
        light = ray.get(refs[0])
        # the groups come without their tensors, each group's tensors the return value at its index
        assert all(g.latents is None and g.bulk is None for g in light)
        assert all(ray.get(ref)["latents"][1].shape[0] == 8 for ref in refs[1 : 1 + len(light)])
        assert all(ray.get(ref) is None for ref in refs[1 + len(light) :])
        groups += light
    assert {g.task.group_id: g.policy_version for g in groups} == {"a": 0, "b": 1}
    ray.kill(worker)


def test_pool_reports_a_group_whose_submit_raised(ray_session, reward_url, clip_path):
    # the worker raises inside submit (no adapter ever arrives); the group must come back
    # as a failure naming the error instead of vanishing and stalling the run
    from editrl.cluster.pool import WorkerPool
    from editrl.rollout_workers.actor import make_rollout_actor

    actor_cls = make_rollout_actor(num_cpus=0)
    pool = WorkerPool(lambda worker_id: actor_cls.remote(
        worker_id, tiny_policy_config(), CORPUS, str(ROOT), reward_url, adapter_wait_s=0.2), initial=1)
    try:
        pool.submit(_task(clip_path, group_id="never-sampled"))
        results, lost = [], []
        deadline = time.monotonic() + 60
        while not results and time.monotonic() < deadline:
            got, gone = pool.poll(timeout_s=0.5)
            results += got
            lost += gone
        assert lost == [] and len(results) == 1, f"the failed group did not come back within 60 s: {results}, lost {lost}"
        [failure] = results
        assert isinstance(failure, GroupFailure) and failure.task.group_id == "never-sampled"
        assert "no adapter loaded after 0.2 s" in failure.reason and "worker 0" in failure.reason
        assert pool.in_flight() == 0
    finally:
        pool.shutdown()


def test_pool_keeps_a_worker_sampling_while_its_groups_wait_for_scores(ray_session, tmp_path, clip_path):
    # a judge much slower than sampling: a worker holds one group to sample (prefetch 1) and
    # up to one more being scored; the first group waiting for its scores must not stop the
    # second from being handed out, and two waiting for scores fill the worker
    import yaml

    from editrl.cluster.pool import WorkerPool
    from editrl.policy.policy import EditPolicy
    from editrl.rollout_workers.actor import make_rollout_actor

    ray = ray_session
    config = yaml.safe_load((ROOT / "configs/reward_server.yaml").read_text())
    config["reward"] = {"version": "slow-judge", "backends": {"pixel": {"type": "pixel", "latency_s": 3.0, "max_concurrent_batches": 2}},
                        "aggregation": "weighted_mean", "weights": config["reward"]["weights"]}
    (tmp_path / "slow.yaml").write_text(yaml.safe_dump(config))
    actor_cls = make_rollout_actor(num_cpus=0)
    policy_config = tiny_policy_config()
    adapter = EditPolicy.from_config(policy_config, CORPUS, root=str(ROOT)).adapter_state()
    with RewardServerProcess(tmp_path / "slow.yaml", tmp_path / "slow.log", 60) as slow_url:
        pool = WorkerPool(lambda worker_id: actor_cls.remote(worker_id, policy_config, CORPUS, str(ROOT), slow_url,
                                                             reward_timeout_s=30), initial=1,
                          prefetch_per_worker=1, scoring_per_worker=1)
        try:
            pool.publish(ray.put(adapter), 0, adapter_checksum(adapter), wait=True)
            worker = pool.workers[0]
            results = []

            def poll_until(done, what: str) -> None:
                deadline = time.monotonic() + 60
                while not done():
                    assert time.monotonic() < deadline, f"timed out waiting until {what}"
                    results.extend(pool.poll(timeout_s=0.05)[0])

            assert pool.capacity() == 1
            pool.submit(_task(clip_path, group_id="g1"))
            assert pool.capacity() == 0  # g1 waits to be sampled or is being sampled
            poll_until(lambda: not worker.submit_refs, "the pool saw g1's submit call return (g1 was sampled)")
            assert results == [] and pool.in_flight() == 1  # g1 waits for its scores (3 s) ...
            assert pool.capacity() == 1  # ... and the worker can sample the next group meanwhile
            pool.submit(_task(clip_path, group_id="g2"))
            poll_until(lambda: not worker.submit_refs, "the pool saw g2's submit call return (g2 was sampled)")
            assert results == [] and pool.in_flight() == 2
            assert pool.capacity() == 0  # two groups waiting for scores: prefetch 1 + scoring 1
            poll_until(lambda: len(results) == 2, "both groups came back")
            assert sorted(g.task.group_id for g in results) == ["g1", "g2"]
            assert all(isinstance(g, Group) for g in results) and pool.capacity() == 1
        finally:
            pool.shutdown()


def test_pool_refuses_limits_below_their_minimum(ray_session):
    from editrl.cluster.pool import WorkerPool

    with pytest.raises(ValueError, match="prefetch_per_worker"):
        WorkerPool(lambda worker_id: None, initial=0, prefetch_per_worker=0)
    with pytest.raises(ValueError, match="scoring_per_worker"):
        WorkerPool(lambda worker_id: None, initial=0, scoring_per_worker=-1)


def test_a_group_returned_by_a_worker_keeps_its_tensors_after_the_worker_dies(ray_session, reward_url, clip_path):
    import os
    import signal

    from editrl.cluster.pool import with_bulk
    from editrl.learner.actor import fetch_bulk
    from editrl.policy.policy import EditPolicy
    from editrl.rollout_workers.actor import make_rollout_actor

    ray = ray_session
    config = tiny_policy_config()
    worker = make_rollout_actor(num_cpus=0).remote(0, config, CORPUS, str(ROOT), reward_url, reward_timeout_s=30)
    adapter = EditPolicy.from_config(config, CORPUS, root=str(ROOT)).adapter_state()
    ray.get(worker.set_adapter.remote(adapter, 0, adapter_checksum(adapter)))
    worker.submit.remote(GroupTask("a", "p0", CORPUS[0], clip_path, seed=1, group_size=3))
    light = []
    while not light:
        refs = worker.collect.options(num_returns=2).remote(5.0, 1)
        light = with_bulk(ray.get(refs[0]), refs[1:])
    os.kill(ray.get(worker.pid.remote()), signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(worker.pid.remote())  # the worker is gone (and not restarted: max_restarts 0)
    # the driver owns the tensors the call returned: they are read from the store after the worker died
    [group], lost, read = fetch_bulk(light)
    assert not lost and read == group.bulk_bytes > 0
    assert group.latent(0).shape == (3, *group.source_latents.shape[1:]) and torch.isfinite(group.latent(0)).all()
