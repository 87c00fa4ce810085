"""Run the reward server as a child process of the training command."""
from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from pathlib import Path

from editrl.rollout_workers.reward_client import RewardClient, RewardServerError

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RewardServerProcess:
    """``python -m editrl.reward_server`` on a free local port, stopped on exit (by its handle).

    Args:
        config_path: ServerConfig YAML.
        log_path: file receiving the server's stdout and stderr.
        startup_timeout_s: seconds to wait for /healthz.
    """

    def __init__(self, config_path: str | Path, log_path: Path, startup_timeout_s: float = 120.0):
        self.config_path = str(config_path)
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> str:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "editrl.reward_server", "--config", self.config_path, "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        with RewardClient(self.url) as client:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"reward server exited with code {self.process.returncode}; see {self.log_path}")
                try:
                    client.wait_until_healthy(timeout_s=1.0)
                    break
                except RewardServerError as exc:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"reward server did not become healthy: {exc}; see {self.log_path}") from exc
        logger.info("reward server up at %s (pid %d, log %s)", self.url, self.process.pid, self.log_path)
        return self.url

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __exit__(self, *exc_info) -> None:
        self.stop()
