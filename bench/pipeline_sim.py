"""A discrete-event model of the pipelined Edit-GRPO loop (simulated time, not measured).

Stages and rules (all durations are injected parameters, in seconds):

* **Workers** (N): each samples one group of G trajectories at a time
  (``sample_s`` per group), with the policy version published when it starts,
  hands the G items to the reward server and starts its next group at once.
* **Admission by version**: at published version v a worker may start a group
  only while fewer than ``B (v + 1 + max_staleness)`` groups have been started
  (dropped ones not counted): enough for the next ``max_staleness + 1`` steps and
  no more, so at most ``B (1 + max_staleness)`` groups are in flight and workers
  do not produce groups that could only go stale.
* **Reward server**: ``reward_slots`` backend calls in flight at once, each
  taking up to ``reward_max_batch`` queued items (first come, first served) and
  ``reward_call_s + reward_item_s * items`` seconds. A group is scored when its
  G items are; items of a group already too stale to be trained are skipped.
* **Learner**: waits for B scored groups (the oldest versions first), drops
  groups more than ``max_staleness`` versions old, trains ``learn_fixed_s + B *
  learn_group_s`` seconds, publishes the adapter (``sync_s``), then bumps the
  version.

Sample and reward durations are multiplied by log-normal jitter with
coefficient of variation ``jitter_cv`` (seeded), so several seeds give a spread.
:func:`capacities` gives each stage's sustainable rate for comparison, and
:func:`sequential_step_s` the step time of the sequential reference loop.
"""
from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class PipelineParams:
    """Injected stage costs of the model (seconds) and the run's shape."""

    num_workers: int
    group_size: int
    groups_per_step: int
    sample_s: float
    reward_call_s: float
    reward_item_s: float
    reward_max_batch: int
    reward_slots: int
    learn_group_s: float
    learn_fixed_s: float = 0.0
    sync_s: float = 0.0
    max_staleness: int = 1
    jitter_cv: float = 0.0


@dataclass
class SimResult:
    """What the simulated run achieved over its measured steps (after warm-up)."""

    samples_per_s: float
    step_s: float
    utilization: dict[str, float]
    """Busy fraction of the workers, the reward server's slots and the learner."""
    stale_dropped: int
    trained_groups: int


@dataclass
class _Group:
    policy_version: int
    remaining: int


@dataclass
class _State:
    params: PipelineParams
    rng: np.random.Generator
    now: float = 0.0
    policy_version: int = 0
    admitted: int = 0
    """Groups started and not dropped."""
    waiting_workers: deque = field(default_factory=deque)
    reward_queue: deque = field(default_factory=deque)
    free_slots: int = 0
    scored: deque = field(default_factory=deque)
    learner_busy: bool = False
    step_times: list = field(default_factory=list)
    busy: dict = field(default_factory=lambda: {"workers": [], "reward": [], "learner": []})
    stale_dropped: int = 0
    trained_groups: int = 0
    events: list = field(default_factory=list)
    counter: int = 0


def _jitter(state: _State) -> float:
    cv = state.params.jitter_cv
    if cv <= 0:
        return 1.0
    sigma = math.sqrt(math.log(1 + cv * cv))
    return float(state.rng.lognormal(-sigma * sigma / 2, sigma))


def _schedule(state: _State, delay: float, kind: str, payload) -> None:
    state.counter += 1
    heapq.heappush(state.events, (state.now + delay, state.counter, kind, payload))


def _may_start(state: _State) -> bool:
    p = state.params
    return state.admitted < p.groups_per_step * (state.policy_version + 1 + p.max_staleness)


def _wake_workers(state: _State) -> None:
    while state.waiting_workers and _may_start(state):
        _start_worker(state, state.waiting_workers.popleft())


def _drop(state: _State) -> None:
    state.stale_dropped += 1
    state.admitted -= 1
    _wake_workers(state)


def _start_worker(state: _State, worker: int) -> None:
    if not _may_start(state):
        state.waiting_workers.append(worker)
        return
    state.admitted += 1
    duration = state.params.sample_s * _jitter(state)
    state.busy["workers"].append((state.now, state.now + duration))
    _schedule(state, duration, "sampled", (worker, _Group(state.policy_version, state.params.group_size)))


def _dispatch_reward(state: _State) -> None:
    p = state.params
    while state.free_slots > 0 and state.reward_queue:
        batch = []
        while state.reward_queue and len(batch) < p.reward_max_batch:
            group = state.reward_queue.popleft()
            if state.policy_version - group.policy_version > p.max_staleness:  # could never be trained: not scored
                group.remaining -= 1
                if group.remaining == 0:
                    _drop(state)
                continue
            batch.append(group)
        if not batch:
            return
        state.free_slots -= 1
        duration = (p.reward_call_s + p.reward_item_s * len(batch)) * _jitter(state)
        state.busy["reward"].append((state.now, state.now + duration))
        _schedule(state, duration, "scored", batch)


def _start_learner(state: _State) -> None:
    p = state.params
    if state.learner_busy:
        return
    while state.scored and state.policy_version - state.scored[0].policy_version > p.max_staleness:
        state.scored.popleft()
        _drop(state)
    if len(state.scored) < p.groups_per_step:
        return
    for _ in range(p.groups_per_step):
        state.scored.popleft()
    state.trained_groups += p.groups_per_step
    state.learner_busy = True
    duration = p.learn_fixed_s + p.groups_per_step * p.learn_group_s + p.sync_s
    state.busy["learner"].append((state.now, state.now + duration))
    _schedule(state, duration, "trained", None)


def simulate(params: PipelineParams, steps: int = 30, warmup_steps: int = 5, seed: int = 0) -> SimResult:
    """Run the model until ``warmup_steps + steps`` learner steps are done.

    Raises:
        ValueError: non-positive counts.
    """
    if min(params.num_workers, params.group_size, params.groups_per_step, params.reward_max_batch, params.reward_slots, steps) < 1:
        raise ValueError("counts must be >= 1")
    state = _State(params=params, rng=np.random.default_rng(seed))
    state.free_slots = params.reward_slots
    for worker in range(params.num_workers):
        _start_worker(state, worker)
    while len(state.step_times) < warmup_steps + steps:
        state.now, _, kind, payload = heapq.heappop(state.events)
        if kind == "sampled":
            worker, group = payload
            state.reward_queue.extend([group] * params.group_size)
            _dispatch_reward(state)
            _start_worker(state, worker)
        elif kind == "scored":
            state.free_slots += 1
            for group in payload:
                group.remaining -= 1
                if group.remaining == 0:
                    state.scored.append(group)
            state.scored = deque(sorted(state.scored, key=lambda g: g.policy_version))
            _dispatch_reward(state)
            _start_learner(state)
        else:
            state.learner_busy = False
            state.policy_version += 1
            state.step_times.append(state.now)
            _wake_workers(state)
            _start_learner(state)
    start, end = state.step_times[warmup_steps - 1] if warmup_steps else 0.0, state.step_times[-1]
    window = end - start
    capacity = {"workers": params.num_workers, "reward": params.reward_slots, "learner": 1}
    utilization = {
        stage: sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals) / (capacity[stage] * window)
        for stage, intervals in state.busy.items()
    }
    return SimResult(
        samples_per_s=steps * params.groups_per_step * params.group_size / window, step_s=window / steps,
        utilization=utilization, stale_dropped=state.stale_dropped, trained_groups=state.trained_groups,
    )


def capacities(params: PipelineParams) -> dict[str, float]:
    """Samples per second each stage sustains on its own (the reward server with full
    batches). Their minimum bounds the pipeline; a run below it with no stage busy
    is held back by the staleness window (groups in flight x their latency)."""
    p = params
    batch = p.reward_max_batch
    return {
        "workers": p.num_workers * p.group_size / p.sample_s,
        "reward": p.reward_slots * batch / (p.reward_call_s + p.reward_item_s * batch),
        "learner": p.groups_per_step * p.group_size / (p.learn_fixed_s + p.groups_per_step * p.learn_group_s + p.sync_s),
    }


def bottleneck(params: PipelineParams, result: SimResult, tolerance: float = 0.9) -> str:
    """The stage that limits a simulated run: the slowest stage when the run reaches
    ``tolerance`` of its capacity, else ``staleness window``."""
    caps = capacities(params)
    slowest = min(caps, key=caps.get)
    return slowest if result.samples_per_s >= tolerance * caps[slowest] else "staleness window"


def sequential_step_s(params: PipelineParams) -> float:
    """One step of the sequential reference loop: each worker samples and scores its
    ``ceil(B / N)`` groups one after the other (scoring a group's G items in calls of at
    most ``reward_max_batch``), then the learner trains and publishes."""
    p = params
    calls = math.ceil(p.group_size / p.reward_max_batch)
    per_group = p.sample_s + calls * p.reward_call_s + p.group_size * p.reward_item_s
    return math.ceil(p.groups_per_step / p.num_workers) * per_group + p.learn_fixed_s + p.groups_per_step * p.learn_group_s + p.sync_s
