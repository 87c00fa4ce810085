"""The rollout worker pool as the driver sees it: which actors exist, which
groups each has in flight, adapter publication, restarts and resizing.

Every group a worker is given is remembered until its result comes back, its tensors
as a reference the driver owns and does not fetch (see :mod:`editrl.rollout_workers.actor`). A
worker that dies (its calls raise ``RayActorError``) hands its in-flight groups
back to be re-issued; Ray restarts it (``max_restarts``) and the pool sends it
the current adapter before it samples again. A group whose ``submit`` call raises
comes back as a :class:`GroupFailure` naming the error. Removing a worker stops giving it
groups and collects the ones it has before the actor is released.

How many groups a worker holds (pipelined mode): at most ``prefetch_per_worker``
waiting to be sampled or being sampled (a ``submit`` call that has not returned);
groups it has sampled and is having scored do not count against that, up to
``scoring_per_worker`` of them, so a worker keeps sampling while a slow judge
scores its earlier groups, and stops when that many are waiting for scores.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, ObjectStoreFullError, OutOfDiskError, RayActorError, RayTaskError

from editrl.protocol.rollout import Group, GroupFailure, GroupTask

logger = logging.getLogger(__name__)


STORE_ERRORS = (ObjectStoreFullError, OutOfDiskError)
"""What a worker's call raises when the object store cannot hold the groups' tensors it returns."""


def with_bulk(results: list[Group | GroupFailure], bulk_refs: list) -> list[Group | GroupFailure]:
    """The results of a ``collect`` or ``sample`` call, each group given the reference to its
    tensors (the call's return value at its index: :func:`editrl.rollout_workers.actor.split_results`);
    the tensors are not fetched."""
    for result, ref in zip(results, bulk_refs):
        if isinstance(result, Group):
            result.bulk = ref
    return results


@dataclass
class _Worker:
    worker_id: int
    actor: object
    in_flight: dict[str, GroupTask] = field(default_factory=dict)
    collect_ref: object | None = None
    submit_refs: dict = field(default_factory=dict)  # submit call -> its task, until the call returns
    draining: bool = False
    needs_adapter: bool = False


class WorkerPool:
    """Rollout actors with in-flight bookkeeping.

    Args:
        make_actor: ``make_actor(worker_id) -> actor handle`` (a started actor).
        initial: number of workers to start.
        prefetch_per_worker: most groups a worker holds waiting to be sampled or
            being sampled (pipelined mode, :meth:`capacity`).
        scoring_per_worker: most groups a worker holds sampled and waiting for their
            scores on top of those; None counts them against ``prefetch_per_worker``
            (a worker then holds that many groups in all).

    Raises:
        ValueError: ``prefetch_per_worker`` below 1 or ``scoring_per_worker`` below 0.
    """

    def __init__(self, make_actor, initial: int, prefetch_per_worker: int = 2, scoring_per_worker: int | None = None):
        if prefetch_per_worker < 1:
            raise ValueError(f"prefetch_per_worker must be >= 1, got {prefetch_per_worker}")
        if scoring_per_worker is not None and scoring_per_worker < 0:
            raise ValueError(f"scoring_per_worker must be >= 0, got {scoring_per_worker}")
        self.prefetch_per_worker = prefetch_per_worker
        self.scoring_per_worker = scoring_per_worker
        self._make_actor = make_actor
        self.workers: dict[int, _Worker] = {}
        self._next_id = 0
        self._adapter: tuple | None = None
        self._staging: list = []  # set_adapter calls not yet checked (pipelined publishes)
        self.restarts = 0
        self.return_failures = 0
        """Groups re-issued because their worker could not return them (:meth:`_returns_failed`)."""
        self._busy_s = 0.0
        for _ in range(initial):
            self.add()
        ray.get([w.actor.ready.remote() for w in self.workers.values()])

    # ---- membership -----------------------------------------------------
    def add(self) -> int:
        """Start one worker (it gets the current adapter before any group)."""
        worker_id = self._next_id
        self._next_id += 1
        worker = _Worker(worker_id, self._make_actor(worker_id), needs_adapter=self._adapter is not None)
        self.workers[worker_id] = worker
        logger.info("rollout worker %d added (%d active)", worker_id, self.active_count())
        return worker_id

    def active_count(self) -> int:
        return sum(1 for w in self.workers.values() if not w.draining)

    def resize(self, target: int) -> None:
        """Grow to or shrink towards ``target`` active workers; a removed worker
        finishes the groups it holds, then is released (see :meth:`poll`)."""
        target = max(1, target)
        while self.active_count() < target:
            self.add()
        active = sorted((w for w in self.workers.values() if not w.draining), key=lambda w: len(w.in_flight))
        for worker in active[: max(0, self.active_count() - target)]:
            worker.draining = True
            logger.info("rollout worker %d draining (%d groups in flight)", worker.worker_id, len(worker.in_flight))

    # ---- adapter --------------------------------------------------------
    def publish(self, ref, policy_version: int, checksum: str, wait: bool) -> float:
        """Send the adapter at ``ref`` (in the object store) to every worker, which
        verifies and stages it at once and loads it before its next group (loads
        happen between groups; a group waiting behind the one being sampled starts
        with it). Returns the seconds spent; with ``wait`` it includes every
        worker's verification and load (nothing is being sampled then)."""
        start = time.perf_counter()
        self._adapter = (ref, policy_version, checksum)
        refs = [w.actor.set_adapter.remote(ref, policy_version, checksum) for w in self.workers.values()]
        for w in self.workers.values():
            w.needs_adapter = False
        if wait:
            self._get_each(refs)
            self._get_each([w.actor.load_staged_adapter.remote() for w in self.workers.values()])
        else:
            self._staging += refs
        return time.perf_counter() - start

    def _ensure_adapter(self, worker: _Worker) -> None:
        if worker.needs_adapter and self._adapter is not None:
            self._staging.append(worker.actor.set_adapter.remote(*self._adapter))
            worker.needs_adapter = False

    def _check_staging(self) -> None:
        """Raise the first adapter rejection (AdapterMismatchError from a worker) among
        the finished set_adapter calls; a dead worker's call is only logged."""
        if self._staging:
            done, self._staging = ray.wait(self._staging, num_returns=len(self._staging), timeout=0)
            self._get_each(done)

    def _get_each(self, refs: list) -> None:
        for ref in refs:
            try:
                ray.get(ref)
            except RayActorError as exc:
                logger.error("adapter load failed on a dead worker: %s", exc)

    # ---- groups ---------------------------------------------------------
    def capacity(self) -> int:
        """How many more groups the active workers can take (see the module docstring);
        a group counts as being sampled until :meth:`poll` sees its ``submit`` call return."""
        return sum(self._room(w) for w in self.workers.values() if not w.draining)

    def _room(self, worker: _Worker) -> int:
        if self.scoring_per_worker is None:
            return max(0, self.prefetch_per_worker - len(worker.in_flight))
        unsampled = len(worker.submit_refs)
        return max(0, min(self.prefetch_per_worker - unsampled,
                          self.prefetch_per_worker + self.scoring_per_worker - len(worker.in_flight)))

    def submit(self, task: GroupTask) -> int:
        """Give ``task`` to the active worker with the most room (ties: the fewest groups
        in flight); returns its id. Check :meth:`capacity` first: a full pool still takes it."""
        worker = min((w for w in self.workers.values() if not w.draining), key=lambda w: (-self._room(w), len(w.in_flight)))
        self._ensure_adapter(worker)
        worker.submit_refs[worker.actor.submit.remote(task)] = task
        worker.in_flight[task.group_id] = task
        return worker.worker_id

    def in_flight(self) -> int:
        return sum(len(w.in_flight) for w in self.workers.values())

    def poll(self, timeout_s: float) -> tuple[list[Group | GroupFailure], list[GroupTask]]:
        """Results that came back within ``timeout_s``, and tasks lost with a dead
        worker (to be re-issued). Releases drained workers with nothing in flight.

        Raises:
            AdapterMismatchError: a worker rejected the published adapter (wrong
                layout or checksum): its groups could never be trained.
        """
        self._check_staging()
        results: list[Group | GroupFailure] = self._failed_submits()
        for worker in self.workers.values():
            if worker.collect_ref is None and worker.in_flight:
                slots = len(worker.in_flight)  # the most groups it can hand back
                worker.collect_ref = worker.actor.collect.options(num_returns=1 + slots).remote(0.2, slots)
        refs = {w.collect_ref[0]: w for w in self.workers.values() if w.collect_ref is not None}
        lost: list[GroupTask] = []
        if refs:
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=timeout_s)
            ready += ray.wait([r for r in refs if r not in ready], num_returns=len(refs) - len(ready), timeout=0)[0]
            for ref in ready:
                worker = refs[ref]
                bulk_refs, worker.collect_ref = worker.collect_ref[1:], None
                try:
                    batch = with_bulk(ray.get(ref), bulk_refs)
                except RayActorError as exc:
                    lost += self._handle_death(worker, exc)
                    continue
                except STORE_ERRORS as exc:
                    lost += self._returns_failed(worker, exc)
                    continue
                for result in batch:
                    if worker.in_flight.pop(result.task.group_id, None) is None:
                        logger.warning("worker %d returned group %s it was not holding; ignored", worker.worker_id, result.task.group_id)
                        continue
                    if isinstance(result, Group):
                        self._busy_s += sum(result.timings.get(k, 0.0) for k in ("encode_s", "sample_s", "decode_s"))
                    results.append(result)
        self._release_drained()
        return results, lost

    def _failed_submits(self) -> list[GroupFailure]:
        """Groups whose ``submit`` call raised (the worker never sampled them, so they
        would never come back from ``collect``), as failures naming the error. A dead
        worker's calls are left to :meth:`_handle_death`, which re-issues its groups."""
        failures = []
        for worker in self.workers.values():
            if not worker.submit_refs:
                continue
            done, _ = ray.wait(list(worker.submit_refs), num_returns=len(worker.submit_refs), timeout=0)
            for ref in done:
                task = worker.submit_refs.pop(ref)
                try:
                    ray.get(ref)
                except RayActorError:
                    continue
                except RayTaskError as exc:  # wraps what the worker raised
                    if worker.in_flight.pop(task.group_id, None) is None:
                        continue
                    reason = f"submit failed on worker {worker.worker_id}: {exc}"
                    logger.error("group %s (prompt %s): %s", task.group_id, task.prompt_id, reason)
                    failures.append(GroupFailure(task=task, worker_id=worker.worker_id, reason=reason))
        return failures

    def _returns_failed(self, worker: _Worker, exc: Exception) -> list[GroupTask]:
        """A ``collect`` that raised (its groups' tensors could not be stored, e.g. the object
        store full and unable to spill): the groups it was handing back are unknown, so every
        group the worker has sampled and not returned is handed back to be re-issued (a copy that
        still comes back later is ignored by the driver)."""
        sampling = set(worker.submit_refs.values())
        lost = [task for task in worker.in_flight.values() if task not in sampling]
        for task in lost:
            worker.in_flight.pop(task.group_id)
        self.return_failures += len(lost)
        logger.error("rollout worker %d could not return its groups (%s); re-issuing %d: %s", worker.worker_id,
                     " ".join(str(exc).split())[:300], len(lost), ", ".join(t.group_id for t in lost))
        return lost

    def _handle_death(self, worker: _Worker, exc: Exception) -> list[GroupTask]:
        lost = list(worker.in_flight.values())
        worker.in_flight.clear()
        worker.submit_refs.clear()
        self.restarts += 1
        logger.error("rollout worker %d died (%s); re-issuing its %d groups: %s", worker.worker_id,
                     type(exc).__name__, len(lost), ", ".join(t.group_id for t in lost))
        try:
            ray.get(worker.actor.ready.remote(), timeout=120)
            worker.needs_adapter = True
            logger.info("rollout worker %d restarted", worker.worker_id)
        except (RayActorError, GetTimeoutError):
            logger.error("rollout worker %d is gone for good; starting a replacement", worker.worker_id)
            del self.workers[worker.worker_id]
            if not worker.draining:
                self.add()
        return lost

    def _release_drained(self) -> None:
        for worker in [w for w in self.workers.values() if w.draining and not w.in_flight]:
            ray.kill(worker.actor)
            del self.workers[worker.worker_id]
            logger.info("rollout worker %d released (%d active)", worker.worker_id, self.active_count())

    def run_sync(self, tasks: list[GroupTask]) -> tuple[list[Group | GroupFailure], list[GroupTask]]:
        """Sample and score ``tasks`` spread over the active workers, each worker one
        group after the other (sequential mode, evaluation). Returns results and
        tasks lost with a dead worker."""
        active = [w for w in self.workers.values() if not w.draining]
        calls = []
        for i, worker in enumerate(active):
            share = tasks[i :: len(active)]
            if share:
                self._ensure_adapter(worker)
                calls.append((worker, share, worker.actor.sample.options(num_returns=1 + len(share)).remote(share)))
        results, lost = [], []
        for worker, share, refs in calls:
            try:
                batch = with_bulk(ray.get(refs[0]), refs[1:])
            except RayActorError as exc:
                worker.in_flight = {t.group_id: t for t in share}
                lost += self._handle_death(worker, exc)
                continue
            except STORE_ERRORS as exc:
                logger.error("rollout worker %d could not return its groups (%s); re-issuing %d", worker.worker_id,
                             " ".join(str(exc).split())[:300], len(share))
                self.return_failures += len(share)
                lost += share
                continue
            for result in batch:
                if isinstance(result, Group):
                    self._busy_s += sum(result.timings.get(k, 0.0) for k in ("encode_s", "sample_s", "decode_s"))
            results += batch
        return results, lost

    def pids(self, timeout_s: float = 2.0) -> dict[int, int]:
        """Process ids of the workers that answer within ``timeout_s`` (a worker still
        starting or restarting is left out); for operators and fault-injection tests."""
        refs = {w.actor.pid.remote(): i for i, w in self.workers.items()}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        pids = {}
        for ref in ready:
            try:
                pids[refs[ref]] = ray.get(ref)
            except RayActorError:
                continue
        return pids

    def busy_seconds(self) -> float:
        """Seconds the workers spent encoding, sampling and decoding so far (all workers)."""
        return self._busy_s

    def shutdown(self) -> None:
        for worker in self.workers.values():
            ray.kill(worker.actor)
        self.workers.clear()
