"""Runtime control of a running job: a named Ray actor the driver polls, and the
``editrl scale`` command that talks to it from anywhere on the cluster."""
from __future__ import annotations

import argparse
import logging
import sys

import ray

logger = logging.getLogger(__name__)

NAMESPACE = "editrl"
DEFAULT_NAME = "editrl-controller"


@ray.remote(num_cpus=0)
class Controller:
    """Holds the desired number of rollout workers and the run's live status."""

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
    """Create the run's named controller (it lives as long as the driver)."""
    return Controller.options(name=name, namespace=NAMESPACE).remote(rollout_workers)


def add_scale_parser(sub) -> None:
    parser = sub.add_parser("scale", help="change the number of rollout workers of a running job")
    parser.add_argument("--rollout-workers", type=int, required=True, help="desired number of rollout workers")
    parser.add_argument("--address", default="auto", help="Ray cluster address of the running job (default: auto)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="controller name of the run (runtime.controller_name)")
    parser.set_defaults(func=run_scale)


def run_scale(args: argparse.Namespace) -> int:
    """Set the desired worker count of the run; prints the run's last status."""
    ray.init(address=args.address, namespace=NAMESPACE, logging_level=logging.WARNING)
    try:
        controller = ray.get_actor(args.name, namespace=NAMESPACE)
    except ValueError:
        sys.stderr.write(f"no running editrl job with controller {args.name!r} on {args.address}\n")
        return 2
    n = ray.get(controller.set_rollout_workers.remote(args.rollout_workers))
    status = ray.get(controller.get_status.remote())
    sys.stdout.write(f"rollout workers: desired {n}, active {status.get('rollout_workers', '?')} at step {status.get('step', '?')}\n")
    ray.shutdown()
    return 0
