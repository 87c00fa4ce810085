"""The ``editrl`` command: ``editrl train``, ``editrl plan``, ``editrl reward-server``, ``editrl scale``, ``editrl submit``.

``editrl train`` checks the config, paths, run directory and reward URL
(:mod:`editrl.cluster.preflight`) before torch or Ray is imported; errors are one
line ``editrl: error: ...`` on stderr, exit code 1.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from editrl.cluster.controller import add_scale_parser
from editrl.cluster.data_commands import add_data_parser
from editrl.cluster.eval_run import add_eval_parser
from editrl.cluster.submit import add_submit_parser


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached ``editrl train``; ``signame`` says which."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


class _ConsoleFilter(logging.Filter):
    """Keeps records marked ``file_only`` off the console and, without ``--debug``, their tracebacks."""

    def __init__(self, debug: bool):
        super().__init__()
        self.debug = debug

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


class _ConsoleFormatter(logging.Formatter):
    def __init__(self, fmt: str, debug: bool):
        super().__init__(fmt)
        self.debug = debug

    def format(self, record: logging.LogRecord) -> str:
        if self.debug or not record.exc_info:
            return super().format(record)
        plain = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return super().format(plain)


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _setup_logging(log_file: Path | None = None, debug: bool = False) -> None:
    """INFO logging to stderr (tracebacks only with ``debug``) and, in full, to ``log_file``."""
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(_ConsoleFilter(debug))
    console.setFormatter(_ConsoleFormatter(LOG_FORMAT, debug))
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handlers.append(file_handler)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    for noisy in ("httpx", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def one_line(exc: BaseException) -> str:
    """An exception as one line: a pydantic ValidationError as ``field: message`` pairs, an
    exception raised in a Ray task or actor as its own message."""
    import pydantic

    if isinstance(exc, pydantic.ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc']) or exc.title}: {e['msg']}"
                 + (f" (got {e['input']!r:.80})" if not isinstance(e.get("input"), dict) else "") for e in exc.errors()]
        return f"invalid config: {'; '.join(parts)}"
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and type(exc).__name__.startswith("RayTaskError"):
        exc = cause  # Ray's wrapper of an exception raised in a task or actor: its message, not Ray's traceback
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 1000 else text[:1000] + "..."


def _error(message: str) -> int:
    sys.stderr.write(f"editrl: error: {message}\n")
    return 1


def _raise_interrupted(signum: int, frame) -> None:
    raise RunInterrupted(signal.Signals(signum).name)


def _load_checked(args: argparse.Namespace):
    """The validated config and run directory, every preflight check passed (no torch, no Ray)."""
    from editrl.cluster.config import load_train_config, parse_overrides
    from editrl.cluster.preflight import check_resume_dir, preflight

    overrides = parse_overrides(args.set)
    if args.address:
        overrides["ray_address"] = args.address
    if args.resume:
        run_dir = Path(args.resume).resolve()
        check_resume_dir(run_dir)
        config = load_train_config(run_dir / "config.yaml", overrides)
    else:
        run_dir = Path(args.run_dir).resolve()
        config = load_train_config(args.config, overrides)
    preflight(config, run_dir, resume=bool(args.resume), overwrite=args.overwrite)
    return config, run_dir


def cmd_train(args: argparse.Namespace) -> int:
    """``editrl train``: check everything that can be checked without torch and Ray, then train.

    Returns:
        0 when the run finished; 1 on an error (one line ``editrl: error: ...`` on
        stderr, the traceback in ``train.log`` and, with ``--debug``, on the console);
        130 when interrupted by SIGINT or SIGTERM (after a checkpoint of the last
        finished step and the ``--resume`` line).
    """
    _setup_logging(None, args.debug)
    try:
        config, run_dir = _load_checked(args)
    except (ValueError, OSError) as exc:  # PreflightError, pydantic.ValidationError, YAML and file errors
        logging.getLogger("editrl").debug("config check failed", exc_info=True)
        return _error(one_line(exc))
    if config.runtime.device_memory_gib is not None or config.runtime.max_inflight_mib is not None:
        problems = _plan_problems(config)
        if problems:
            return _error(f"does not fit (editrl plan): {'; '.join(problems)}")
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(run_dir / "train.log", args.debug)
    log = logging.getLogger("editrl")
    log.info("run directory: %s", run_dir)
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        from editrl.cluster.train import train

        summary = train(config, run_dir, resume=bool(args.resume))
    except KeyboardInterrupt as exc:
        return _interrupted(run_dir, getattr(exc, "signame", "SIGINT"), log)
    except Exception as exc:  # noqa: BLE001 - every failure ends as one line, the traceback in train.log
        log.error("run ended: error: %s", one_line(exc), exc_info=True, extra={"file_only": True})
        return _error(f"{one_line(exc)} (traceback in {run_dir / 'train.log'}{'' if args.debug else '; or rerun with --debug'})")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("run ended: finished after %d steps", summary.get("steps", config.steps))
    sys.stdout.write(f"run directory: {run_dir}\n")
    sys.stdout.write(
        f"held-out reward {summary['reward_heldout_initial']:.3f} -> {summary['reward_heldout_final']:.3f} "
        f"({summary['heldout_gain_in_sem']:.1f} combined standard errors) in {summary['wall_time_s']:.0f} s\n"
    )
    return 0


def _plan_problems(config) -> list[str]:
    """What of ``config`` does not fit its devices by :func:`editrl.cluster.plan.plan_run` (a few seconds)."""
    from editrl.cluster.plan import plan_run

    return plan_run(config).problems()


def _interrupted(run_dir: Path, signame: str, log: logging.Logger) -> int:
    from editrl.cluster.preflight import latest_checkpoint_name

    checkpoint = latest_checkpoint_name(run_dir)
    if checkpoint is None:
        log.warning("run ended: interrupted by %s before any checkpoint", signame)
        sys.stderr.write(f"editrl: interrupted by {signame} before the first checkpoint; nothing to resume in {run_dir}\n")
    else:
        log.warning("run ended: interrupted by %s; newest checkpoint %s", signame, checkpoint)
        sys.stderr.write(f"editrl: interrupted by {signame}; newest checkpoint {checkpoint}. Continue with:\n"
                         f"  editrl train --resume {run_dir}\n")
    return 130


def cmd_plan(args: argparse.Namespace) -> int:
    """``editrl plan``: print the memory plan of a config (:mod:`editrl.cluster.plan`).

    Returns:
        0 when every process fits; 1 when one does not (a line per process kind that does
        not fit, with the numbers, on stderr) or the config is wrong (one line).
    """
    import json

    from editrl.cluster.config import load_train_config, parse_overrides

    _setup_logging(None, False)
    logging.getLogger().setLevel(logging.WARNING)
    try:
        config = load_train_config(args.config, parse_overrides(args.set))
        from editrl.cluster.plan import format_plan, plan_dict, plan_run

        plan = plan_run(config)
    except (ValueError, OSError) as exc:
        return _error(one_line(exc))
    sys.stdout.write(json.dumps(plan_dict(plan), indent=2) + "\n" if args.json else format_plan(plan))
    problems = plan.problems()
    for problem in problems:
        sys.stderr.write(f"editrl: does not fit: {problem}\n")
    return 1 if problems else 0


def cmd_reward_server(args: argparse.Namespace) -> int:
    from editrl.reward_server.__main__ import main as reward_main

    argv = ["--config", args.config]
    if args.host:
        argv += ["--host", args.host]
    if args.port:
        argv += ["--port", str(args.port)]
    return reward_main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="editrl", description="Edit-GRPO post-training of video-editing DiTs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="run Edit-GRPO training")
    p_train.add_argument("--config", default="configs/default.yaml", help="YAML preset (TrainConfig)")
    p_train.add_argument("--run-dir", default="runs/default", help="where outputs go")
    p_train.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    p_train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint (its config.yaml)")
    p_train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field, e.g. steps=5 or learner.learning_rate=1e-3")
    p_train.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --run-dir (refused without it)")
    p_train.add_argument("--debug", action="store_true", help="print full tracebacks on the console (they are always in train.log)")
    p_train.set_defaults(func=cmd_train)

    p_plan = sub.add_parser("plan", help="estimate the memory of a config's processes and check it fits")
    p_plan.add_argument("--config", default="configs/default.yaml", help="YAML preset (TrainConfig)")
    p_plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p_plan.add_argument("--json", action="store_true", help="print the plan as JSON (bytes)")
    p_plan.set_defaults(func=cmd_plan)

    p_reward = sub.add_parser("reward-server", help="run the reward server (HTTP)")
    p_reward.add_argument("--config", default="configs/reward_server.yaml", help="YAML ServerConfig")
    p_reward.add_argument("--host", help="bind address (default from config: 127.0.0.1)")
    p_reward.add_argument("--port", type=int, help="port (default from config)")
    p_reward.set_defaults(func=cmd_reward_server)

    add_scale_parser(sub)
    add_submit_parser(sub)
    add_data_parser(sub)
    add_eval_parser(sub)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
