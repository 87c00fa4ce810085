"""Runtime control of a running job: a named Ray actor the driver polls, and the
``editrl scale`` command that talks to it from anywhere on the cluster.

Ray is imported only when an actor is started or ``editrl scale`` runs, so the
command line can check a config before it pays for the import.
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys

logger = logging.getLogger(__name__)

NAMESPACE = "editrl"
DEFAULT_NAME = "editrl-controller"


class Controller:
    """Holds the desired number of rollout workers and the run's live status (a Ray actor, see :func:`start_controller`)."""

    def __init__(self, rollout_workers: int):
        self.desired = rollout_workers
        self.status: dict = {}

    def set_rollout_workers(self, n: int) -> int:
        if n < 1:
            raise ValueError(f"need at least one rollout worker, got {n}")
        self.desired = n
        return n

    def get_rollout_workers(self) -> int:
        return self.desired

    def report(self, status: dict) -> None:
        self.status = status

    def get_status(self) -> dict:
        return self.status


def start_controller(name: str, rollout_workers: int):
    """Create the run's named controller actor (it lives as long as the driver); returns its handle."""
    import ray

    return ray.remote(num_cpus=0)(Controller).options(name=name, namespace=NAMESPACE).remote(rollout_workers)


def add_scale_parser(sub) -> None:
    parser = sub.add_parser("scale", help="change the number of rollout workers of a running job")
    parser.add_argument("--rollout-workers", type=int, required=True, help="desired number of rollout workers")
    parser.add_argument("--address", default="auto", help="Ray cluster address of the running job (default: auto)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="controller name of the run (runtime.controller_name)")
    parser.set_defaults(func=run_scale)


def _unreachable(address: str, timeout_s: float = 3.0) -> str | None:
    """Why nothing can answer at a ``host:port`` Ray address (None if something listens, or
    for ``auto`` and ``ray://`` addresses, which Ray resolves itself)."""
    if address == "auto" or "://" in address or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return None
    except ValueError:
        return f"port {port!r} is not a number"
    except OSError as exc:
        return f"nothing answers there ({exc.strerror or type(exc).__name__})"


def run_scale(args: argparse.Namespace) -> int:
    """Set the desired worker count of the run; prints the run's last status.

    Returns:
        0 when the run took the new size; 2 when no Ray cluster answers at
        ``args.address`` or it runs no editrl job under ``args.name`` (one line on stderr).
    """
    unreachable = _unreachable(args.address)
    if unreachable:
        sys.stderr.write(f"editrl: error: no running editrl job found at address {args.address!r}: {unreachable}\n")
        return 2
    import ray

    try:
        ray.init(address=args.address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        logger.debug("ray.init(%r) failed", args.address, exc_info=True)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        sys.stderr.write(f"editrl: error: no running editrl job found at address {args.address!r}: no Ray cluster there ({first[:200]})\n")
        return 2
    try:
        try:
            controller = ray.get_actor(args.name, namespace=NAMESPACE)
        except ValueError:
            sys.stderr.write(f"editrl: error: no running editrl job found at address {args.address!r} "
                             f"(no controller named {args.name!r})\n")
            return 2
        n = ray.get(controller.set_rollout_workers.remote(args.rollout_workers))
        status = ray.get(controller.get_status.remote())
    finally:
        ray.shutdown()
    sys.stdout.write(f"rollout workers: desired {n}, active {status.get('rollout_workers', '?')} at step {status.get('step', '?')}\n")
    return 0
