"""``editrl submit``: run ``editrl train`` as a Ray job through the Ray Jobs API.

The project directory is uploaded as the job's ``working_dir`` and the job's
entrypoint is ``editrl train --config <preset> --run-dir <dir> --address auto``:
inside a Ray job ``RAY_ADDRESS`` points at the cluster, so the training driver
joins it instead of starting a local Ray. The command then follows the job's
logs until it finishes and exits 0 only if the job SUCCEEDED.

The cluster's image must already hold the project's dependencies (torch and the
rest of ``pyproject.toml``, as ``cluster/Dockerfile`` builds them): the runtime
environment uploads code and configs only and never installs packages per job.
Ray's ``working_dir`` support puts the unpacked directory first on the
``PYTHONPATH`` of the driver and of every worker of the job, so the uploaded
code takes precedence over a copy installed in the image.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from editrl.resources import checkout_root

logger = logging.getLogger(__name__)

PROJECT_ROOT = checkout_root() or Path.cwd()
"""The default working directory a job uploads: the checkout editrl runs from, else the current directory."""
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# gitignore-style patterns, relative to the working directory: virtual
# environments, run outputs, VCS data and caches never travel with a job.
DEFAULT_EXCLUDES = (".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info", "runs", "bench/results")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_config_path(config: str | Path, working_dir: str | Path) -> str:
    """The preset's path inside the uploaded working directory (POSIX, relative).

    A relative ``config`` is looked up in the current directory, then in ``working_dir``.

    Raises:
        FileNotFoundError: the preset does not exist.
        ValueError: the preset lies outside ``working_dir``, so it would not be uploaded.
    """
    root = Path(working_dir).resolve()
    path = Path(config)
    if not path.is_absolute() and not path.is_file():
        path = root / path
    path = path.resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no such config file: {config}")
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        raise ValueError(f"--config {config} is outside the working directory {root}; only files inside it are uploaded") from None


def build_entrypoint(config: str, run_dir: str | None = None, overrides: Sequence[str] = (),
                     train_args: Sequence[str] = (), address: str = "auto") -> str:
    """The shell command the job runs: ``editrl train`` joining the job's cluster.

    Args:
        config: the preset's path relative to the working directory.
        run_dir: where the run writes; None keeps ``editrl train``'s default.
        overrides: ``KEY=VALUE`` strings, each forwarded as ``--set``.
        train_args: further arguments appended verbatim.
        address: the Ray address the driver joins (``auto``: the job's cluster).
    """
    argv = ["editrl", "train", "--config", config]
    if run_dir is not None:
        argv += ["--run-dir", run_dir]
    argv += ["--address", address]
    for override in overrides:
        argv += ["--set", override]
    argv += list(train_args)
    return shlex.join(argv)


def build_runtime_env(working_dir: str | Path, env_vars: dict[str, str] | None = None,
                      excludes: Sequence[str] = DEFAULT_EXCLUDES) -> dict:
    """The job's runtime_env: the uploaded working directory, its excludes and environment variables.

    ``PYTHONUNBUFFERED=1`` makes the job's output reach the log stream as it is
    written. No ``pip``/``py_executable``: the image provides the dependencies.
    """
    return {
        "working_dir": str(Path(working_dir).resolve()),
        "excludes": list(excludes),
        "env_vars": {"PYTHONUNBUFFERED": "1", **(env_vars or {})},
    }


def parse_pairs(pairs: Sequence[str], option: str) -> dict[str, str]:
    """``KEY=VALUE`` strings as a dict (raises SystemExit naming ``option`` on a malformed one)."""
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{option} expects KEY=VALUE, got {pair!r}")
        parsed[key] = value
    return parsed


def add_submit_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``submit`` command to an ``add_subparsers()`` object; returns its parser."""
    p = subparsers.add_parser("submit", help="run editrl train as a Ray job on a cluster (Ray Jobs API)",
                              description="Upload the project and run `editrl train --address auto` as a Ray job.")
    p.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
                   help=f"Ray dashboard / job server URL (default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    p.add_argument("--config", default="configs/default.yaml", help="train preset YAML inside the working dir (uploaded with it)")
    p.add_argument("--run-dir", help="run directory as the job sees it; use shared storage (e.g. /data/runs/x)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override forwarded to editrl train")
    p.add_argument("--working-dir", default=str(PROJECT_ROOT), help="directory uploaded as the job's working_dir (default: the project root)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable of the job's processes")
    p.add_argument("--job-id", help="submission id (default: generated by Ray)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting instead of following the logs")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver (the learner)")
    p.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver (the learner)")
    p.add_argument("--entrypoint-resource", action="append", default=[], metavar="NAME=AMOUNT",
                   help="custom resource reserved for the driver, e.g. learner=1 (places it on the learner group)")
    p.add_argument("--entrypoint", help="run this shell command instead of editrl train (to check an image or a cluster); "
                   "--config, --run-dir, --set and extra arguments are then ignored")
    p.add_argument("train_args", nargs="*", metavar="-- TRAIN_ARGS", help="further arguments for editrl train, after --")
    p.set_defaults(func=run_submit)
    return p


def run_submit(args: argparse.Namespace) -> int:
    """Submit the job; unless ``--no-wait``, stream its logs to stdout until it ends.

    Like ``ray job submit``, extra HTTP headers for the job server (e.g. for an
    authenticating proxy) come from ``$RAY_JOB_HEADERS`` as a JSON object.

    Returns:
        0 if the job SUCCEEDED (or was submitted, with ``--no-wait``), 1 if it
        failed, was stopped or could not be submitted, 130 if following was
        interrupted (the job keeps running).
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from ray.job_submission import JobSubmissionClient

    working_dir = Path(args.working_dir).resolve()
    if args.entrypoint:
        entrypoint = args.entrypoint
        metadata = {"editrl_entrypoint": "custom"}
    else:
        try:
            config = job_config_path(args.config, working_dir)
        except (FileNotFoundError, ValueError) as exc:
            raise SystemExit(str(exc)) from None
        validate_config(working_dir / config, args.set)
        if args.run_dir is None or not Path(args.run_dir).is_absolute():
            logger.warning("run directory %s is relative: it lands in the job's temporary working directory on the driver's "
                           "node and goes away with it; give an absolute path on shared storage", args.run_dir or "runs/default")
        entrypoint = build_entrypoint(config, args.run_dir, args.set, args.train_args)
        metadata = {"editrl_config": config, "editrl_run_dir": args.run_dir or ""}
    runtime_env = build_runtime_env(working_dir, parse_pairs(args.env, "--env"))
    try:
        resources = {k: float(v) for k, v in parse_pairs(args.entrypoint_resource, "--entrypoint-resource").items()}
    except ValueError as exc:
        raise SystemExit(f"--entrypoint-resource expects NAME=AMOUNT with a number: {exc}") from None

    headers = json.loads(os.environ["RAY_JOB_HEADERS"]) if os.environ.get("RAY_JOB_HEADERS") else None
    try:
        client = JobSubmissionClient(args.address, headers=headers)
        submission_id = client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env, submission_id=args.job_id, metadata=metadata,
            entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus,
            entrypoint_resources=resources or None,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        logger.error("could not submit the job to %s: %s", args.address, exc)
        return 1
    logger.info("submitted %s to %s: %s", submission_id, args.address, entrypoint)
    sys.stdout.write(f"submission id: {submission_id}\n")
    sys.stdout.flush()
    if args.no_wait:
        sys.stdout.write(f"follow it with: ray job logs --follow --address {args.address} {submission_id}\n")
        return 0
    try:
        status = follow_job(client, submission_id, sys.stdout)
    except KeyboardInterrupt:
        sys.stdout.write(f"\nstopped following; the job keeps running (ray job stop --address {args.address} {submission_id})\n")
        return 130
    info = client.get_job_info(submission_id)
    sys.stdout.write(f"job {submission_id} {status}" + (f": {info.message}" if info.message and status != "SUCCEEDED" else "") + "\n")
    return 0 if status == "SUCCEEDED" else 1


def validate_config(path: Path, overrides: Sequence[str]) -> None:
    """Check the preset and overrides here, before the cluster spends anything on them.

    Raises:
        SystemExit: the config does not validate (the message names the field).
    """
    import pydantic

    from editrl.cluster.config import load_train_config, parse_overrides

    try:
        load_train_config(path, parse_overrides(list(overrides)))
    except pydantic.ValidationError as exc:
        raise SystemExit(f"config {path} does not validate:\n{exc}") from None


def follow_job(client, submission_id: str, out: TextIO, poll_s: float = 1.0) -> str:
    """Write the job's logs to ``out`` as they come, until it ends; return its final status.

    Logs are streamed (``tail_job_logs``, a websocket); where streaming fails
    (e.g. a proxy without websockets) the status and logs are polled instead.
    """
    written = 0

    async def tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()
            written += len(chunk)

    try:
        asyncio.run(tail())
    except Exception as exc:  # noqa: BLE001 - any transport failure falls back to polling
        logger.warning("log streaming failed (%s: %s); polling the job instead", type(exc).__name__, exc)
    while True:
        status = str(client.get_job_status(submission_id))
        logs = client.get_job_logs(submission_id)
        if len(logs) > written:
            out.write(logs[written:])
            out.flush()
            written = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
