"""``editrl train`` run as a new user runs it: bad input fails fast in one line naming
the field, file or URL, before torch or Ray is imported; a reward server that
answers garbage is summarised once; Ctrl-C keeps the finished steps and says how
to resume."""
import http.server
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_policy_config
from standins import http_standin

ROOT = Path(__file__).resolve().parent.parent
EDITRL = Path(sys.executable).parent / "editrl"
# runs editrl's main() and then says which heavy packages the process imported
PROBE = (
    "import sys\n"
    "from editrl.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "sys.stdout.write('heavy imports: ' + ','.join(m for m in ('torch', 'ray', 'diffusers') if m in sys.modules) + '\\n')\n"
    "sys.exit(rc)\n"
)


def editrl(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """``editrl ARGS`` through main() in a fresh interpreter; stdout ends with the heavy imports line."""
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_fails_before_heavy_imports(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("editrl: error: "), result.stderr  # one line, no traceback
    assert message in lines[-1], lines[-1]
    assert result.stdout.splitlines()[-1] == "heavy imports: ", result.stdout


def tiny_preset(tmp_path: Path, **overrides) -> Path:
    """A preset of a tiny, short run (the model built in code, the bundled prompt tables)."""
    data = {
        "steps": 2, "prompts_per_step": 2, "group_size": 2,
        "policy": tiny_policy_config().model_dump(mode="json"),
        "learner": {"learning_rate": 1e-2, "torch_threads": 1},
        "rollout": {"reward_timeout_s": 30},
        "topology": {"rollout": {"workers": 1}},
        "runtime": {"mode": "sequential", "checkpoint_every": 0},
        "eval": {"seeds_per_prompt": 1, "max_prompts": 1, "num_videos_saved": 0},
    }
    for key, value in overrides.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(("setting", "message"), [
    ("policy.height=60", "policy.height=60: must be a multiple of 8 (VAE factor 4 x patch 2"),
    ("policy.width=36", "policy.width=36: must be a multiple of 8"),
    ("policy.num_frames=4", "policy.num_frames=4: must be 2k+1"),
])
def test_geometry_that_the_model_cannot_take_is_named_with_the_nearest_valid_values(tmp_path, setting, message):
    result = editrl("train", "--config", str(tiny_preset(tmp_path)), "--run-dir", str(tmp_path / "run"), "--set", setting, cwd=tmp_path)
    assert_fails_before_heavy_imports(result, message)
    assert "nearest " + {"policy.height=60": "56 or 64", "policy.width=36": "32 or 40", "policy.num_frames=4": "3 or 5"}[setting] in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was created for a run that cannot start


@pytest.mark.parametrize(("settings", "message"), [
    # 40 x 40 pixels, 5 frames: latent 3 x 10 x 10, patches 1 x 2 x 2: 3 x 5 x 5 = 75 tokens
    (["policy.height=40", "policy.width=40", "topology.learner.ranks=2", "topology.learner.sequence_parallel=2"],
     "topology.learner.sequence_parallel=2 must divide the 75 tokens per sequence; degrees that work with topology.learner.ranks=2: [1]"),
    (["topology.learner.ranks=6", "topology.learner.sequence_parallel=3"],
     "topology.learner.sequence_parallel=3 must divide the 2 attention heads of the DiT; degrees that work with topology.learner.ranks=6: [1, 2]"),
    (["policy.kind=vace", "topology.learner.ranks=2", "topology.learner.sequence_parallel=2"],
     "topology.learner.sequence_parallel=2: policy.kind=vace has no context-parallel plan in diffusers; use 1"),
    (["topology.learner.ranks=3", "topology.learner.sequence_parallel=2"], "topology.learner.sequence_parallel=2 must divide topology.learner.ranks=3"),
], ids=["tokens", "heads", "vace", "ranks"])
def test_a_sequence_parallel_degree_that_cannot_split_the_work_is_refused_with_the_numbers(tmp_path, settings, message):
    sets = [arg for setting in settings for arg in ("--set", setting)]
    result = editrl("train", "--config", str(tiny_preset(tmp_path)), "--run-dir", str(tmp_path / "run"), *sets, cwd=tmp_path)
    assert_fails_before_heavy_imports(result, message)


def test_geometry_factors_are_read_from_a_checkpoints_config_files(tmp_path):
    # the bundled warm checkpoint (VAE with two downsamplings, one temporal; patch 1x2x2), read without diffusers
    result = editrl("train", "--run-dir", str(tmp_path / "run"), "--set", "policy.height=60", "--set", "policy.num_frames=5", cwd=ROOT)
    assert_fails_before_heavy_imports(result, "policy.height=60: must be a multiple of 8 (VAE factor 4 x patch 2 of checkpoint warm_checkpoint); nearest 56 or 64")
    # a Wan2.1-like VAE (three downsamplings, two temporal) asks for 16 pixels and 4k+1 frames
    ckpt = tmp_path / "wan"
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        (ckpt / sub).mkdir(parents=True)
    (ckpt / "vae" / "config.json").write_text(json.dumps({"temperal_downsample": [False, True, True], "z_dim": 16}))
    (ckpt / "transformer" / "config.json").write_text(json.dumps(
        {"_class_name": "WanTransformer3DModel", "in_channels": 16, "patch_size": [1, 2, 2]}))
    result = editrl("train", "--run-dir", str(tmp_path / "run"), "--set", f"policy.checkpoint={ckpt}", "--set", "policy.height=64",
                    "--set", "policy.num_frames=4", cwd=ROOT)
    assert_fails_before_heavy_imports(result, "policy.num_frames=4: must be 4k+1 (VAE temporal factor 4) for checkpoint wan; nearest 1 or 5")
    result = editrl("train", "--run-dir", str(tmp_path / "run"), "--set", f"policy.checkpoint={ckpt}", "--set", "policy.height=60", cwd=ROOT)
    assert_fails_before_heavy_imports(result, "policy.height=60: must be a multiple of 16 (VAE factor 8 x patch 2 of checkpoint wan); nearest 48 or 64")


def test_a_missing_checkpoint_is_named_as_the_policy_checkpoint(tmp_path):
    result = editrl("train", "--config", str(tiny_preset(tmp_path)), "--run-dir", str(tmp_path / "run"),
                    "--set", "policy.checkpoint=no/such/model", cwd=tmp_path)
    assert_fails_before_heavy_imports(result, f"policy.checkpoint=no/such/model: no such directory ({tmp_path / 'no/such/model'})")


def test_a_missing_prompt_table_is_named(tmp_path):
    result = editrl("train", "--config", str(tiny_preset(tmp_path)), "--run-dir", str(tmp_path / "run"),
                    "--set", "data.heldout_prompts=gone.parquet", cwd=tmp_path)
    assert_fails_before_heavy_imports(result, f"data.heldout_prompts=gone.parquet: no such file or directory ({tmp_path / 'gone.parquet'})")


def test_a_yaml_syntax_error_names_the_file_and_the_line(tmp_path):
    preset = tmp_path / "broken.yaml"
    preset.write_text("steps: 2\npolicy: {height: 32\n")
    result = editrl("train", "--config", str(preset), "--run-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert_fails_before_heavy_imports(result, f"{preset}: not valid YAML")
    assert f'in "{preset}", line 2' in result.stderr


def test_a_field_error_is_one_line_naming_the_field(tmp_path):
    result = editrl("train", "--config", str(tiny_preset(tmp_path)), "--run-dir", str(tmp_path / "run"), "--set", "steps=0", cwd=tmp_path)
    assert_fails_before_heavy_imports(result, "invalid config: steps: Input should be greater than or equal to 1 (got 0)")


def test_a_used_run_directory_is_refused_without_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    (run / "notes.txt").write_text("mine")
    result = editrl("train", "--config", str(tiny_preset(tmp_path)), "--run-dir", str(run), cwd=tmp_path)
    assert_fails_before_heavy_imports(result, f"--run-dir {run} is not empty (metrics.jsonl, notes.txt, tensorboard); "
                                              f"continue that run with --resume {run}, or pass --overwrite")
    assert (run / "metrics.jsonl").is_file()


def test_overwrite_clears_the_old_runs_outputs_only_after_every_other_check_passed(tmp_path):
    from editrl.cluster.preflight import prepare_run_dir

    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("old\n")
    (run / "notes.txt").write_text("mine")
    # a config error leaves the old run alone, even with --overwrite
    result = editrl("train", "--config", str(tiny_preset(tmp_path)), "--run-dir", str(run), "--overwrite",
                    "--set", "policy.height=60", cwd=tmp_path)
    assert_fails_before_heavy_imports(result, "policy.height=60")
    assert (run / "metrics.jsonl").read_text() == "old\n"
    prepare_run_dir(run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # a run's outputs go, other files stay


def test_resume_without_a_checkpoint_is_refused_at_once(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(tiny_preset(tmp_path).read_text())
    (run / "metrics.jsonl").write_text("")
    result = editrl("train", "--resume", str(run), cwd=tmp_path)
    assert_fails_before_heavy_imports(result, f"--resume {run}: no checkpoint in {run / 'checkpoints'}")
    result = editrl("train", "--resume", str(tmp_path / "nothing"), cwd=tmp_path)
    assert_fails_before_heavy_imports(result, f"--resume {tmp_path / 'nothing'}: no such run directory")


class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class NotFound(_Quiet):
    def do_GET(self) -> None:  # noqa: N802
        self.send_error(404, "no such route")


class HealthyButNoScoring(_Quiet):
    """Healthy, and POST is not implemented: http.server answers 501 with an HTML page."""

    def do_GET(self) -> None:  # noqa: N802
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Starting(_Quiet):
    def do_GET(self) -> None:  # noqa: N802
        self.send_error(503, "starting")


def test_a_refused_reward_url_fails_within_seconds_naming_it(tmp_path):
    result = editrl("train", "--config", str(tiny_preset(tmp_path)), "--run-dir", str(tmp_path / "run"),
                    "--set", "reward_server.url=http://127.0.0.1:1", cwd=tmp_path)
    assert_fails_before_heavy_imports(result, "reward_server.url=http://127.0.0.1:1: GET http://127.0.0.1:1/healthz failed: connection refused")


def test_a_reward_url_answering_404_or_501_fails_at_once_with_what_it_said(tmp_path):
    with http_standin(NotFound) as url:
        result = editrl("train", "--config", str(tiny_preset(tmp_path)), "--run-dir", str(tmp_path / "run"),
                        "--set", f"reward_server.url={url}", cwd=tmp_path)
    assert_fails_before_heavy_imports(result, f"reward_server.url={url}: GET {url}/healthz answered HTTP 404: Error response Error code: 404 Message: no such route.")
    with http_standin(_Quiet) as url:  # no do_GET: 501 with an HTML page
        result = editrl("train", "--config", str(tiny_preset(tmp_path)), "--run-dir", str(tmp_path / "run"),
                        "--set", f"reward_server.url={url}", cwd=tmp_path)
    assert_fails_before_heavy_imports(result, f"GET {url}/healthz answered HTTP 501: Error response Error code: 501 Message: Unsupported method")
    assert "<" not in result.stderr  # the page is summarised, not dumped


def test_a_starting_reward_server_is_waited_for_and_said_once(caplog):
    from editrl.cluster.preflight import PreflightError, check_reward_url

    with http_standin(Starting) as url, caplog.at_level(logging.WARNING, logger="editrl.cluster.preflight"):
        with pytest.raises(PreflightError, match=r"not ready after 2 s .*answered HTTP 503"):
            check_reward_url(url, timeout_s=2.0, poll_interval_s=0.1)
    waiting = [r for r in caplog.records if "waiting up to" in r.getMessage()]
    assert len(waiting) == 1 and url in waiting[0].getMessage()


def test_a_501_to_a_score_request_is_one_summarised_error_without_retries(caplog):
    import numpy as np

    from editrl.protocol.reward import ScoreItem, ScoreRequest, VideoPayload
    from editrl.rollout_workers.reward_client import RewardClient, RewardServerError

    video = VideoPayload.from_frames(np.zeros((1, 8, 8, 3), np.uint8))

    with http_standin(HealthyButNoScoring) as url, RewardClient(url, timeout_s=5, max_attempts=5, backoff_initial_s=0.01) as client:
        client.wait_until_healthy(timeout_s=5)
        with caplog.at_level(logging.WARNING), pytest.raises(RewardServerError) as info:
            client.score(ScoreRequest(request_id="r1", items=[ScoreItem(item_id="g/0", instruction="brighter", source=video, edited=video)]))
    message = str(info.value)
    assert "HTTP 501: Error response Error code: 501 Message: Unsupported method ('POST')." in message
    assert "<" not in message and len(message) < 400
    assert not [r for r in caplog.records if "attempt" in r.getMessage()]  # not retried


def test_scale_without_a_running_job_is_one_line(tmp_path):
    result = subprocess.run([str(EDITRL), "scale", "--rollout-workers", "2", "--address", "127.0.0.1:1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("editrl: error: no running editrl job found at address '127.0.0.1:1'"), result.stderr


@pytest.mark.slow
def test_sigint_during_training_checkpoints_the_last_step_stops_everything_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    preset = tiny_preset(tmp_path, steps=40, runtime={"mode": "sequential", "checkpoint_every": 0})
    proc = subprocess.Popen([str(EDITRL), "train", "--config", str(preset), "--run-dir", str(run)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not any(json.loads(line).get("kind") == "train" for line in _lines(run / "metrics.jsonl")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no training step finished in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert f"Continue with:\n  editrl train --resume {run}\n" in err
    checkpoint = (run / "checkpoints" / "latest").read_text()
    steps_done = max(json.loads(line)["step"] for line in _lines(run / "metrics.jsonl") if json.loads(line)["kind"] == "train")
    assert int(checkpoint.removeprefix("step_")) >= 1 and json.loads((run / "checkpoints" / checkpoint / "driver.json").read_text())["step"] >= 1
    assert int(checkpoint.removeprefix("step_")) in (steps_done, steps_done - 1)  # the last finished step (or the one before, mid-update)
    log = (run / "train.log").read_text()
    assert f"run ended: interrupted by SIGINT; newest checkpoint {checkpoint}" in log
    # the reward server the run started is gone
    pid = int(log.split("reward server up at ")[1].split("(pid ")[1].split(",")[0])
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _checkpointed_run(tmp_path: Path, ranks: int, lora_rank: int, attention: str = "attn2") -> Path:
    """A run directory as a run leaves it: config.yaml and checkpoint step_000002 (driver state
    and an adapter of the given rank on ``attention``'s q/k/v/out of two blocks)."""
    import numpy as np
    from safetensors.numpy import save_file

    run = tmp_path / "run"
    step = run / "checkpoints" / "step_000002"
    step.mkdir(parents=True)
    (run / "config.yaml").write_text(tiny_preset(tmp_path).read_text())
    (run / "checkpoints" / "latest").write_text(step.name)
    (step / "driver.json").write_text(json.dumps({"step": 2, "learner_ranks": ranks}))
    tensors = {f"blocks.{b}.{attention}.{p}.lora_{m}.weight": np.zeros((lora_rank, 64) if m == "A" else (64, lora_rank), np.float32)
               for b in range(2) for p in ("to_q", "to_k", "to_v", "to_out.0") for m in ("A", "B")}
    save_file(tensors, str(step / "adapter_model.safetensors"))
    return run


def test_a_resume_with_another_rank_count_or_adapter_is_refused_before_anything_starts(tmp_path):
    lora = tiny_policy_config().lora  # rank 4 on both attentions
    run = _checkpointed_run(tmp_path, ranks=2, lora_rank=lora.rank, attention="attn1")
    result = editrl("train", "--resume", str(run), cwd=tmp_path)
    assert_fails_before_heavy_imports(result, "checkpoint step_000002 was written by 2 learner ranks, the config asks "
                                              "topology.learner.ranks=1; resume with --set topology.learner.ranks=2")
    result = editrl("train", "--resume", str(run), "--set", "topology.learner.ranks=2", "--set", f"policy.lora.rank={lora.rank * 2}",
                    cwd=tmp_path)
    assert_fails_before_heavy_imports(result, f"has LoRA rank [{lora.rank}], the config asks policy.lora.rank={lora.rank * 2}")
    result = editrl("train", "--resume", str(run), "--set", "topology.learner.ranks=2", "--set", "policy.lora.attention=[self, cross]",
                    cwd=tmp_path)
    assert_fails_before_heavy_imports(result, "adapts attn1.to_k, attn1.to_out.0, attn1.to_q, attn1.to_v; the config")


def test_an_error_raised_in_a_ray_task_is_one_line_of_its_own_message():
    from ray.exceptions import RayTaskError

    from editrl.cli import one_line

    raised = RayTaskError("_rank_zero", "Traceback (most recent call last):\n  File ...\n", RuntimeError("learner rank 1 died"))
    assert one_line(raised.as_instanceof_cause()) == "learner rank 1 died"
