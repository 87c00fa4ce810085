"""The ``editrl`` command: ``editrl train`` and ``editrl reward-server``."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from editrl.cluster.controller import add_scale_parser
from editrl.cluster.submit import add_submit_parser


def _setup_logging(log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    for noisy in ("httpx", "urllib3", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(args: argparse.Namespace) -> int:
    from editrl.cluster.config import load_train_config, parse_overrides
    from editrl.cluster.train import train

    overrides = parse_overrides(args.set)
    if args.address:
        overrides["ray_address"] = args.address
    if args.resume:
        run_dir = Path(args.resume).resolve()
        config = load_train_config(run_dir / "config.yaml", overrides)
    else:
        run_dir = Path(args.run_dir).resolve()
        config = load_train_config(args.config, overrides)
    # SIGTERM (e.g. a cancelled job) unwinds like Ctrl-C, so the reward server and Ray are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    run_dir.mkdir(parents=True, exist_ok=True)
    _setup_logging(run_dir / "train.log")
    logging.getLogger("editrl").info("run directory: %s", run_dir)
    summary = train(config, run_dir, resume=bool(args.resume))
    sys.stdout.write(f"run directory: {run_dir}\n")
    sys.stdout.write(
        f"held-out reward {summary['reward_heldout_initial']:.3f} -> {summary['reward_heldout_final']:.3f} "
        f"({summary['heldout_gain_in_sem']:.1f} combined standard errors) in {summary['wall_time_s']:.0f} s\n"
    )
    return 0


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
    p_train.set_defaults(func=cmd_train)

    p_reward = sub.add_parser("reward-server", help="run the reward server (HTTP)")
    p_reward.add_argument("--config", default="configs/reward_server.yaml", help="YAML ServerConfig")
    p_reward.add_argument("--host", help="bind address (default from config: 127.0.0.1)")
    p_reward.add_argument("--port", type=int, help="port (default from config)")
    p_reward.set_defaults(func=cmd_reward_server)

    add_scale_parser(sub)
    add_submit_parser(sub)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
