"""Run reward servers for tests: the app in a uvicorn thread, or ``python -m editrl.reward_server`` as a process.

Both are real HTTP servers on free local ports, stopped through their own
handles (the uvicorn ``Server`` object, the ``Popen`` handle).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml

from editrl.cluster.reward_process import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


class ServedURL(str):
    """A reward server's URL that also carries the server process's ``pid``."""

    pid: int

    def __new__(cls, url: str, pid: int) -> "ServedURL":
        served = super().__new__(cls, url)
        served.pid = pid
        return served


def wait_healthy(url: str, timeout_s: float = 30.0, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    """Poll ``GET {url}/healthz`` until it answers 200; fail the test (with the server's log) when ``proc``
    exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"reward server for {url} exited with {proc.returncode} before it was healthy:\n"
                        f"{log.read_text() if log else ''}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)  # poll interval
    pytest.fail(f"reward server at {url} did not answer GET /healthz with 200 within {timeout_s} s:\n"
                f"{log.read_text() if log else ''}")


@contextlib.contextmanager
def app_server(app) -> Iterator[str]:
    """Serve a FastAPI app with uvicorn in a thread (lifespan included); yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:  # uvicorn offers no event for this; its flag is polled
            if not thread.is_alive():
                pytest.fail(f"uvicorn exited before it served {url} (see the log)")
            if time.monotonic() > deadline:
                pytest.fail(f"uvicorn did not start serving {url} within 30 s")
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextlib.contextmanager
def process_servers(tmp_path: Path, specs: list[tuple[str, dict, dict[str, str] | None]]) -> Iterator[list[str]]:
    """``python -m editrl.reward_server --config <config>`` per (name, config, env), started together; yields
    their URLs (:class:`ServedURL`, with the process id).

    PYTHONPATH is this worktree; each process is stopped through its Popen handle.
    """
    procs: list[subprocess.Popen] = []
    started: list[tuple[str, subprocess.Popen, Path]] = []
    try:
        for name, config, env in specs:
            port = free_port()
            config_path = tmp_path / f"{name}_{port}.yaml"
            config_path.write_text(yaml.safe_dump(config))
            log_path = tmp_path / f"{name}_{port}.log"
            full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "editrl.reward_server", "--config", str(config_path), "--port", str(port)],
                    cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                )
            procs.append(proc)
            started.append((ServedURL(f"http://127.0.0.1:{port}", proc.pid), proc, log_path))
        for url, proc, log_path in started:
            wait_healthy(url, proc=proc, log=log_path)
        yield [url for url, _, _ in started]
    finally:
        stop_processes(procs)


def stop_processes(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process still running, then wait for it (SIGKILL after 15 s)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@contextlib.contextmanager
def process_server(tmp_path: Path, config: dict, env: dict[str, str] | None = None, name: str = "server") -> Iterator[str]:
    """One ``python -m editrl.reward_server`` process (see :func:`process_servers`); yields its URL."""
    with process_servers(tmp_path, [(name, config, env)]) as (url,):
        yield url
