"""The reward server killed with SIGKILL in the middle of a pipelined training run and
restarted on the same port, standalone (in-process score cache) and with Redis (shared
cache, real Redis): the run completes, every group is trained at most once and only on
scores the server computed, and the groups whose scoring failed during the outage are
counted and re-issued or dropped, as ``runtime.on_score_failure`` says.

The kill happens once the first step's metrics line is in ``metrics.jsonl``; the restart
once the driver has logged a group whose scoring failed (the client's retry window is
made short, two attempts, so the outage outlasts it). Both points are polled with
deadlines, never guessed with sleeps."""
from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import tiny_policy_config
from reward_servers import REPO_ROOT, wait_healthy

from editrl.cluster.topology import RolloutTopology, TopologyConfig
from editrl.cluster.config import EvalConfig, RewardServerSettings, RolloutConfig, RuntimeConfig, TrainConfig
from editrl.cluster.reward_process import free_port
from editrl.cluster.train import train
from editrl.learner.config import LearnerConfig

pytestmark = pytest.mark.slow

STEPS, PROMPTS_PER_STEP, GROUP_SIZE = 12, 2, 2
"""Enough steps after the restart (the tiny model trains a step in about half a second)
for re-issued groups, sampled last, to be trained too."""
REISSUED = re.compile(r"^group (\S+) \(prompt \S+\) not scored, re-issued \((\d+) of at most (\d+)\)")
DROPPED = re.compile(r"^group (\S+) \(prompt \S+\) dropped")
SCORED = re.compile(r"request (\S+): (\d+) items \((\d+) failed\)")
"""The reward server's line per answered request."""


class _Records(logging.Handler):
    """Keeps the driver's log records about failed groups; ``failed`` is set at the first."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.messages: list[str] = []
        self.failed = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if REISSUED.match(message) or DROPPED.match(message):
            self.messages.append(message)
            self.failed.set()


class _Server:
    """``python -m editrl.reward_server`` on a fixed port, started again on the same port
    after a kill; each process is handled through its own Popen handle."""

    def __init__(self, tmp_path: Path, config: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = tmp_path / "reward_server.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.tmp_path = tmp_path
        self.logs: list[Path] = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log_path = self.tmp_path / f"reward_server_{len(self.logs)}.log"
        self.logs.append(log_path)
        with log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "editrl.reward_server", "--config", str(self.config_path), "--port", str(self.port)],
                cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=log, stderr=subprocess.STDOUT,
            )
        wait_healthy(self.url, proc=self.proc, log=log_path)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=15)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)

    def scored(self) -> list[tuple[str, int, int]]:
        """(request id, items, failed items) of every request either process answered."""
        return [(m[1], int(m[2]), int(m[3])) for log in self.logs for m in SCORED.finditer(log.read_text())]


def _first_step_logged(metrics: Path, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metrics.is_file():
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
                     if line.strip() and json.loads(line)["kind"] == "train"]
            if steps:
                return max(steps)
        time.sleep(0.05)  # poll interval: the driver writes metrics.jsonl
    raise AssertionError(f"no train record in {metrics} within {timeout_s} s")


def _redis_dimensions(redis_url: str, prefix: str) -> list[dict]:
    """The dimensions of every score the servers stored in Redis under ``prefix``."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:score:*", count=500))
        return [json.loads(raw)["dimensions"] for raw in client.mget(keys) if raw is not None]
    finally:
        client.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend, on_score_failure", [("standalone", "reissue"), ("redis", "drop")])
def test_reward_server_killed_and_restarted_mid_run(tmp_path, request, backend, on_score_failure):
    server_config = yaml.safe_load((REPO_ROOT / "configs" / "reward_server.yaml").read_text())
    redis_url = prefix = None
    if backend == "redis":
        redis_url, prefix = request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
        server_config.update(redis_url=redis_url, redis_prefix=prefix)
    server = _Server(tmp_path, server_config)
    run_dir = tmp_path / "run"
    config = TrainConfig(
        steps=STEPS, prompts_per_step=PROMPTS_PER_STEP, group_size=GROUP_SIZE,
        policy=tiny_policy_config(),
        learner=LearnerConfig(learning_rate=1e-2, torch_threads=1),
        # two attempts (one 0.5 s backoff): the outage outlasts the client's retries
        topology=TopologyConfig(rollout=RolloutTopology(workers=2)), rollout=RolloutConfig(reward_timeout_s=15, reward_max_attempts=2),
        runtime=RuntimeConfig(mode="pipelined", max_staleness=STEPS, checkpoint_every=0,
                              on_score_failure=on_score_failure, max_score_reissues=20),
        reward_server=RewardServerSettings(url=server.url, startup_timeout_s=30),
        eval=EvalConfig(seeds_per_prompt=1, max_prompts=1, num_videos_saved=0),
    )
    records = _Records()
    run_logger = logging.getLogger("editrl.cluster.run")
    old_level = run_logger.level
    run_logger.setLevel(logging.INFO)
    run_logger.addHandler(records)
    events: dict = {}

    def operator():
        try:
            events["killed_after_step"] = _first_step_logged(run_dir / "metrics.jsonl", timeout_s=240)
            server.kill()
            if not records.failed.wait(timeout=120):
                raise AssertionError("no group failed within 120 s of the reward server's kill")
            server.start()
            events["restarted"] = True
        except BaseException as exc:  # a thread's exception fails no test: the test reports it from events
            events["error"] = repr(exc)

    server.start()
    thread = threading.Thread(target=operator, daemon=True)
    try:
        thread.start()
        summary = train(config, run_dir)
        thread.join(timeout=60)
    finally:
        run_logger.removeHandler(records)
        run_logger.setLevel(old_level)
        server.stop()
    assert events.get("restarted"), events
    assert events["killed_after_step"] < STEPS

    # the run completed every step on groups trained once each
    assert summary["steps"] == STEPS and summary["policy_version"] == STEPS
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in metrics if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, STEPS + 1))
    rollouts = pq.read_table(run_dir / "rollouts").to_pylist()
    trained = [r["group_id"] for r in rollouts if r["sample"] == 0]
    assert len(trained) == len(set(trained)) == STEPS * PROMPTS_PER_STEP
    assert sum(r["groups_trained"] for r in train_records) == len(trained)
    assert len(rollouts) == len(trained) * GROUP_SIZE

    # no reward made up: every trained group was answered by a server with all items scored
    scored = {rid for rid, items, failed in server.scored() if items == GROUP_SIZE and failed == 0}
    assert set(trained) <= scored, set(trained) - scored
    restarted_only = {rid for rid, _, _ in SCORED.findall(server.logs[1].read_text())} - {
        rid for rid, _, _ in SCORED.findall(server.logs[0].read_text())}
    assert restarted_only & set(trained)  # the run went on training on the restarted server's scores
    assert all(math.isfinite(r["reward"]) for r in rollouts)
    if backend == "redis":  # every recorded score is one the servers computed and stored
        stored = _redis_dimensions(redis_url, prefix)
        for row in rollouts:
            dimensions = json.loads(row["dimensions_json"])
            assert any(all(s.get(k) == v for k, v in dimensions.items()) for s in stored), (row["group_id"], dimensions)

    # the groups whose scoring failed were counted, logged, and re-issued or dropped as configured
    assert summary["groups_failed"] == len(records.messages) >= 1
    assert sum(r["groups_failed"] for r in train_records) == summary["groups_failed"]
    assert train_records[-1]["worker_restarts_total"] == 0  # no re-issue came from a dead worker
    reissued = [REISSUED.match(m) for m in records.messages if REISSUED.match(m)]
    dropped = [DROPPED.match(m)[1] for m in records.messages if DROPPED.match(m)]
    if on_score_failure == "reissue":
        assert not dropped and len(reissued) == summary["groups_reissued"] >= 1
        assert {m[1] for m in reissued} & set(trained)  # a group that failed was sampled again and trained
        for m in reissued:
            assert int(m[2]) <= int(m[3]) == 20
    else:
        assert not reissued and summary["groups_reissued"] == 0
        assert dropped and not set(dropped) & set(trained)  # a dropped group is never trained
