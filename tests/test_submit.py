"""``editrl submit``: the job it builds for a preset, and real submissions to a
real local Ray head with its job server (started here, stopped by its handle)."""
from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from editrl.cli import main
from editrl.cluster.reward_process import free_port
from editrl.cluster.submit import DEFAULT_EXCLUDES, PROJECT_ROOT, build_entrypoint, build_runtime_env, job_config_path

REPO_ROOT = Path(__file__).resolve().parent.parent
MARKER = "editrl-job-ok"


def test_entrypoint_and_runtime_env_for_a_preset():
    config = job_config_path("configs/default.yaml", REPO_ROOT)
    assert config == "configs/default.yaml"
    assert job_config_path(REPO_ROOT / "configs" / "cluster.yaml", REPO_ROOT) == "configs/cluster.yaml"
    entrypoint = build_entrypoint(config, "/data/runs/x", ["steps=5", "learner.learning_rate=3e-3", "policy.checkpoint=/m/my model"])
    assert entrypoint == ("editrl train --config configs/default.yaml --run-dir /data/runs/x --address auto "
                          "--set steps=5 --set learner.learning_rate=3e-3 --set 'policy.checkpoint=/m/my model'")
    assert build_entrypoint(config) == "editrl train --config configs/default.yaml --address auto"
    assert build_entrypoint(config, "/r", train_args=["--resume", "/r"]).endswith("--address auto --resume /r")

    env = build_runtime_env(REPO_ROOT, {"HF_HOME": "/data/hf"})
    assert env == {
        "working_dir": str(REPO_ROOT),
        "excludes": [".git", ".venv", "__pycache__", ".pytest_cache", "*.egg-info", "runs", "bench/results"],
        "env_vars": {"PYTHONUNBUFFERED": "1", "HF_HOME": "/data/hf"},
    }
    assert "pip" not in env and "py_executable" not in env  # the image provides the dependencies
    assert PROJECT_ROOT == REPO_ROOT


def test_a_preset_must_be_uploaded_with_the_working_dir(tmp_path):
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text("steps: 1\n")
    with pytest.raises(ValueError, match="outside the working directory"):
        job_config_path(outside, REPO_ROOT)
    with pytest.raises(FileNotFoundError):
        job_config_path("configs/no_such_preset.yaml", REPO_ROOT)


def test_a_bad_override_is_refused_before_anything_is_submitted():
    # nothing listens on this address: the config is checked first, so the error names the field
    with pytest.raises(SystemExit, match="stepz"):
        main(["submit", "--address", "http://127.0.0.1:9", "--config", "configs/default.yaml", "--set", "stepz=3"])


# ------------------------------------------------------------ a real Ray head
def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _descendants(pid: int) -> dict[int, str]:
    try:
        return {p.pid: p.name() for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return {}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --block`` with the dashboard and job server on free ports.

    Token authentication with a token made here, a private temp dir (so no other
    process on this machine finds this head by default) and no port Ray would
    otherwise fix (6379 is Redis's). Yields ``(url, env, headers)``: the job
    server URL, the environment of ``editrl submit`` (its token included) and the
    headers of an in-process client. Stopped with SIGTERM through the Popen
    handle; every process it started is checked gone, and killed by PID if not.
    """
    from ray.job_submission import JobSubmissionClient

    temp_dir = tempfile.mkdtemp(prefix="ers", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard_port, agent_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO_ROOT), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               RAY_USAGE_STATS_ENABLED="0", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--temp-dir", temp_dir,
               "--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
               "--include-dashboard", "true", "--dashboard-agent-listen-port", str(agent_port),
               "--ray-client-server-port", str(free_port()), "--num-cpus", "1", "--disable-usage-stats"]
    log_path = Path(temp_dir) / "ray_start.log"
    with log_path.open("w") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    headers = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
    try:
        deadline = time.monotonic() + 180
        while True:
            if head.poll() is not None:
                pytest.skip(f"the Ray head with its dashboard could not start here (exit {head.returncode}):\n"
                            f"{log_path.read_text()[-3000:]}")
            if _port_open(agent_port):  # the job server hands jobs to the head's dashboard agent
                try:
                    JobSubmissionClient(url, headers=headers)
                    break
                except (ConnectionError, RuntimeError):
                    pass
            assert time.monotonic() < deadline, f"job server at {url} not ready in 180 s:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.3)  # poll interval
        yield url, env, headers
    finally:
        started = {head.pid: "ray start", **_descendants(head.pid)}
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.2)  # poll interval; what is still alive at the deadline is killed and reported below
        leftover = {pid: name for pid, name in started.items() if _alive(pid)}
        for pid in leftover:
            psutil.Process(pid).kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"processes of the test's Ray head outlived it (killed now): {leftover}"


JOB_SCRIPT = '''\
"""Runs inside the submitted job: joins the cluster as editrl train does, reports what it sees."""
import json, os
from pathlib import Path

uploaded = sorted(str(p) for p in Path(".").rglob("*") if p.is_file())  # before imports write __pycache__

import ray

import editrl
from editrl.cluster.ray_cluster import init_ray

init_ray("auto")


@ray.remote(num_cpus=1)
def probe():
    import editrl
    return {"file": editrl.__file__, "env": os.environ.get("EDITRL_SUBMIT_TEST")}


report = {"driver_file": editrl.__file__, "cwd": os.getcwd(), "worker": ray.get(probe.remote()), "uploaded": uploaded}
print("report=" + json.dumps(report))
print("{marker}")
'''


def _submit(url: str, env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "editrl", "submit", "--address", url, *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_job_runs_in_the_uploaded_working_dir_and_joins_the_cluster(ray_head, tmp_path):
    from ray.job_submission import JobSubmissionClient

    url, env, headers = ray_head
    # the project as a working dir, with things that must not travel (no .gitignore: the excludes alone drop them)
    work = tmp_path / "project"
    shutil.copytree(REPO_ROOT, work, ignore=shutil.ignore_patterns(".git", ".gitignore", ".venv", "runs", "__pycache__", "*.egg-info"))
    for junk in ("runs/old/big.bin", ".venv/bin/python", "bench/results/r.json", "editrl/__pycache__/x.pyc", ".git/HEAD"):
        (work / junk).parent.mkdir(parents=True, exist_ok=True)
        (work / junk).write_text("x")
    (work / "bench" / "keep.py").write_text("")
    (work / "job_check.py").write_text(JOB_SCRIPT.replace("{marker}", MARKER))

    job_id = f"editrl-test-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    # the job sets PYTHONPATH itself: init_ray must not add a conflicting one inside a job
    result = _submit(url, env, "--working-dir", str(work), "--job-id", job_id,
                     "--env", "EDITRL_SUBMIT_TEST=from-submit", "--env", "PYTHONPATH=/opt/extra",
                     "--entrypoint", f"{shlex.quote(sys.executable)} job_check.py")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"submission id: {job_id}" in result.stdout
    assert MARKER in result.stdout and f"job {job_id} SUCCEEDED" in result.stdout  # the logs were followed to the end

    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("report="))[len("report="):])
    cwd = report["cwd"]
    assert "runtime_resources" in cwd  # Ray's unpacked copy, not the directory it came from
    assert report["driver_file"] == os.path.join(cwd, "editrl", "__init__.py")
    assert report["worker"] == {"file": os.path.join(cwd, "editrl", "__init__.py"), "env": "from-submit"}
    uploaded = set(report["uploaded"])
    assert {"job_check.py", "cluster/submit.py", "configs/default.yaml", "bench/keep.py"} <= uploaded
    assert not {f for f in uploaded if f.split("/")[0] in (".venv", "runs", ".git") or "__pycache__" in f or f.startswith("bench/results/")}

    info = JobSubmissionClient(url, headers=headers).get_job_info(job_id)
    assert info.status == "SUCCEEDED" and info.metadata == {"editrl_entrypoint": "custom"}
    assert info.runtime_env["excludes"] == list(DEFAULT_EXCLUDES)
    print(f"submission and log following took {elapsed:.1f} s")


@pytest.mark.slow
def test_a_failing_job_fails_the_command_and_no_wait_returns_at_once(ray_head, tmp_path, monkeypatch, capsys):
    from ray.job_submission import JobSubmissionClient

    url, _, headers = ray_head
    monkeypatch.setenv("RAY_JOB_HEADERS", json.dumps(headers))  # in process: the token as ray job submit takes it
    work = tmp_path / "w"
    work.mkdir()
    assert main(["submit", "--address", url, "--working-dir", str(work), "--entrypoint", "echo about-to-fail; exit 3"]) == 1
    out = capsys.readouterr().out
    assert "about-to-fail" in out and "FAILED" in out and "exit code 3" in out

    job_id = f"editrl-nowait-{uuid.uuid4().hex[:8]}"
    # `sleep 30`: a job still running when submit returns (stopped below)
    assert main(["submit", "--address", url, "--working-dir", str(work), "--job-id", job_id, "--no-wait", "--entrypoint", "sleep 30"]) == 0
    client = JobSubmissionClient(url, headers=headers)
    assert client.get_job_status(job_id) in ("PENDING", "RUNNING")  # returned without waiting for the job
    out = capsys.readouterr().out
    assert f"submission id: {job_id}" in out and "ray job logs --follow" in out
    assert client.stop_job(job_id)
