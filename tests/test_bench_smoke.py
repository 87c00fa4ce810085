"""The benchmark harness on trivially small settings: the result schema, the report
and the pipeline model. Nothing here asserts how long anything took."""
import json

import httpx
import pytest
import torch

from bench import gpu, learner_batching, pipelined, sampling_overhead
from bench.harness import interleaved, paired_ratio
from bench.http_load import LeanClient, build_requests, lean_latencies
from bench.pipeline_sim import PipelineParams, bottleneck, capacities, simulate
from bench.report import render
from bench.results import SCHEMA_VERSION, BenchResult, Stats, read_results, write_result
from bench.suite import BENCHMARKS, run_one
from editrl.reward_server.app import create_app
from editrl.reward_server.config import ServerConfig
from tests.reward_servers import app_server


def test_interleaved_rotates_the_order_and_resets_before_each_call():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1,
                        before={"a": lambda: calls.append("reset")})
    assert calls == ["reset", "a", "b", "b", "reset", "a", "reset", "a", "b"]
    assert {name: len(samples) for name, samples in times.items()} == {"a": 2, "b": 2}
    ratio = paired_ratio("a / b", "a", "b", {"a": [2.0, 6.0], "b": [1.0, 2.0]})
    assert ratio.stats.samples == [2.0, 3.0] and ratio.stats.median == 2.5


def test_stats_quartiles():
    stats = Stats.of([4.0, 1.0, 3.0, 2.0])
    assert (stats.median, stats.q1, stats.q3, stats.iqr, stats.min, stats.max) == (2.5, 1.75, 3.25, 1.5, 1.0, 4.0)
    assert stats.samples == [4.0, 1.0, 3.0, 2.0] and stats.scaled(10).median == 25.0


def test_smoke_results_round_trip_through_json_and_the_report(tmp_path, monkeypatch):
    results = [
        run_one("sampling_overhead", "smoke"),
        learner_batching.measure(learner_batching.SETTINGS["smoke"]),
        pipelined.not_measured("smoke", "not yet measured: a reason"),
        gpu.measure(sampling_overhead.SETTINGS["smoke"], learner_batching.SETTINGS["smoke"], "smoke"),  # CPU, tiny sizes
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    skipped = gpu.run("cpu")
    for result in results:
        write_result(result, tmp_path)
    write_result(skipped.model_copy(update={"name": "gpu_skipped"}), tmp_path)
    raw = json.loads((tmp_path / "sampling_overhead.json").read_text())
    assert raw["schema_version"] == SCHEMA_VERSION and raw["status"] == "measured"
    assert {"date_utc", "packages", "load_average", "cpu_model", "git_commit"} <= set(raw["environment"])
    assert {m["name"] for m in raw["measurements"]} == {"diffusers_wan_pipeline", "ode", "sde_logprob"}
    assert set(raw["measurements"][0]["metrics"]["time_ms"]) >= {"median", "q1", "q3", "iqr", "mean", "std", "samples"}
    assert raw["targets"][0]["comparison"] == "<=" and isinstance(raw["targets"][0]["met"], bool)

    loaded = {r.name: r for r in read_results(tmp_path)}
    assert [r.item for r in read_results(tmp_path)] == sorted(r.item for r in loaded.values())
    learner = loaded["learner_batching"]
    assert learner.measurement("k=3").metrics["max_abs_grad_diff"] < 1e-6  # batched timesteps: same gradients
    assert loaded["gpu"].status == "measured" and any(m.group == "weight sync (one process)" for m in loaded["gpu"].measurements)
    assert loaded["gpu_skipped"].status == "skipped" and "no CUDA device" in loaded["gpu_skipped"].reason
    slot = loaded["pipelined_vs_sequential"]
    assert slot.status == "not_measured" and "not yet measured" in slot.reason
    assert [t.met for t in slot.targets] == [None, None]

    page = render(list(loaded.values()))
    assert page.startswith("# Benchmarks") and "## Targets" in page
    assert "## 1. Pipelined vs sequential step" in page and "## 7. GPU section" in page
    assert "| sde_logprob |" in page and "skipped: no CUDA device" in page
    assert "## 3. Weight sync" in page  # no result file: the section says so


def test_lean_client_gets_the_same_answers_as_httpx_and_reports_failures():
    """The reward benchmark's lean latency client against the real server app: the same
    response bodies as httpx for the same requests, several requests on one keep-alive
    connection, a latency that contains the server's own time, and a rejected request
    raised with its status."""
    requests = build_requests(3, 2, 5, 16, "lean-test", video_format="raw")
    with app_server(create_app(ServerConfig(max_wait_s=0.0, cache={"enabled": False}))) as url:
        expected = [httpx.post(f"{url}/v1/score", content=r.body, headers={"Content-Type": "application/json"}).json()
                    for r in requests]
        with LeanClient(url) as client:
            answers = [client.post("/v1/score", r.body) for r in requests]  # one connection, three requests
        assert [status for status, *_ in answers] == [200, 200, 200]
        assert [json.loads(body) for _, body, _, _ in answers] == expected
        for _, _, seconds, app_s in answers:
            assert 0 < app_s < seconds  # the response starts inside the server before its last byte reaches the client
        assert len(lean_latencies(url, requests)) == 3
        broken = build_requests(1, 1, 5, 16, "lean-test-broken", video_format="raw")[0]
        broken.body = broken.body.replace(b'"format":"raw"', b'"format":"gif"', 1)
        with pytest.raises(RuntimeError, match="HTTP 422"):
            lean_latencies(url, [broken])


def test_every_benchmark_module_declares_its_result():
    from bench.suite import load

    items = [load(name).ITEM for name in BENCHMARKS]
    assert items == list(range(1, 13))
    assert BenchResult.model_json_schema()["properties"]["status"]["enum"] == ["measured", "not_measured", "skipped", "failed"]


def test_learner_memory_smoke_measures_both_modes():
    from bench import learner_memory

    result = learner_memory.measure(learner_memory.SETTINGS["smoke"])
    assert result.status == "measured" and [m.params["activation_checkpointing"] for m in result.measurements] == ["off", "on"]
    assert result.settings["tokens_per_sequence"] == 2 * 4 * 4  # latents (2, 8, 8) over the patch (1, 2, 2)
    assert result.targets[0].value is None and result.targets[0].met is None  # no memory probe in this profile


@pytest.mark.parametrize("workers, max_staleness, limit", [
    (1, 1, "workers"), (2, 1, "workers"), (12, 2, "learner"),
    (12, 1, "staleness window"),  # sampling a step's groups takes longer than training one step
])
def test_pipeline_model_never_beats_its_slowest_stage(workers, max_staleness, limit):
    params = PipelineParams(num_workers=workers, group_size=4, groups_per_step=4, sample_s=4.0, reward_call_s=0.5,
                            reward_item_s=0.1, reward_max_batch=8, reward_slots=2, learn_group_s=1.0, sync_s=0.1,
                            max_staleness=max_staleness)
    result = simulate(params, steps=20, warmup_steps=3)
    bound = min(capacities(params).values())
    assert result.samples_per_s <= bound * 1.001
    assert bottleneck(params, result) == limit  # reached within 10% unless the staleness window limits
    assert result.stale_dropped == 0 and all(0.0 <= u <= 1.0 + 1e-9 for u in result.utilization.values())


@pytest.mark.slow
def test_pipelined_smoke_runs_both_schedules_through_the_runtime(tmp_path):
    """Both schedules on the tests' tiny model through editrl.cluster.run.Run, Ray and a reward
    server, in each shape: the result has every row, ratio and target, and renders."""
    settings = pipelined.SETTINGS["smoke"]
    result = run_one("pipelined", "smoke")
    assert result.status == "measured", result.reason
    rows = {(m.group, m.name): m for m in result.measurements}
    labels = [shape.label for shape in settings.shapes]
    assert labels == ["2 workers", "1 worker"]
    for label in labels:
        for mode in pipelined.MODES:
            step = rows[(f"per steady step, {label}", mode)]
            assert step.metrics["step_s"].n == settings.repeats
            stages = next(m for (group, name), m in rows.items() if name == mode and group.startswith(f"stages per steady step, {label} "))
            assert set(pipelined.STAGES) | {"sample_s", "decode_s", "reward_wait_s"} <= set(stages.metrics)
            assert stages.metrics["reward_calls"] > 0  # the server's /metrics were read
            # both read from the server: wall time with a call in flight, and the calls' summed seconds
            busy, calls = stages.metrics["reward_server_busy_s"].samples, stages.metrics["reward_calls_s"].samples
            assert all(b > 0 for b in busy) and all(c > 0 for c in calls)
            assert step.metrics["compute_bound_s"].samples == [
                max(stages.metrics[k].samples[i] for k in pipelined.STAGES if k != "reward_server_busy_s") for i in range(len(busy))]
            bound = step.metrics["bound_s"].samples
            assert bound == [max(stages.metrics[k].samples[i] for k in pipelined.STAGES) for i in range(len(bound))]
        actors = rows[("peak RSS of the runtime's processes (whole benchmark, both schedules)", label)].metrics
        assert actors["learner_rss_mib"] > 0
        # the shape's override took effect: one rollout actor in the 1-worker shape
        assert len([k for k in actors if k.startswith("worker_")]) == result.settings["per_shape"][label]["rollout_workers"]
        assert result.settings["per_shape"][label]["reward_latency_s"] == settings.reward_latency_s
    assert [result.settings["per_shape"][label]["rollout_workers"] for label in labels] == [2, 1]
    # workers x their scoring requests in flight
    assert result.settings["per_shape"]["2 workers"]["reward_concurrent_batches"] == 2 * result.settings["per_shape"]["1 worker"]["reward_concurrent_batches"]
    assert [r.name for r in result.ratios][:2] == ["sequential / pipelined [2 workers]", "pipelined / max(stage) [2 workers]"]
    assert [t.name for t in result.targets] == ["pipelined_speedup[2 workers]", "pipelined_of_bound[2 workers]",
                                                "pipelined_speedup[1 worker]", "pipelined_of_bound[1 worker]"]
    assert all(isinstance(t.met, bool) for t in result.targets)
    write_result(result, tmp_path)
    page = render(read_results(tmp_path))
    assert "| sequential / pipelined [1 worker] |" in page and "Target `pipelined_of_bound[2 workers]`" in page


def test_learner_ranks_smoke_times_one_and_two_ranks():
    from bench import learner_ranks

    result = learner_ranks.measure(learner_ranks.SETTINGS["smoke"])
    assert [(m.params["ranks"], m.params["threads_per_rank"]) for m in result.measurements] == [(1, 2), (1, 1), (2, 1)]
    assert all(m.metrics["update_s"].n == 1 and m.metrics["update_s"].median > 0 for m in result.measurements)
    assert len(result.ratios) == 2 and all(r.stats.median > 0 for r in result.ratios)


def test_cluster_sim_smoke_takes_stage_times_from_the_plan_flops():
    from bench import cluster_sim

    result = cluster_sim.measure(cluster_sim.SETTINGS["smoke"])
    stages = result.settings["stages"]
    # 14B at 480p x 81 frames: ~1.8 PFLOP per sequence forward (DESIGN.md: ~1.7), 1.3B about a sixth of it
    assert 1700 < stages["Wan2.1-14B"]["forward_tflop"] < 1900
    assert 4 < stages["Wan2.1-14B"]["forward_tflop"] / stages["Wan2.1-1.3B"]["forward_tflop"] < 8
    # sampling runs 20 steps of the CFG pair, training 2 steps x 5 forwards: 2x the sampling time per group
    assert stages["Wan2.1-14B"]["sample_s"] == pytest.approx(2 * stages["Wan2.1-14B"]["train_group_s"])
    assert {m.metrics["bottleneck"] for m in result.measurements} <= {"workers", "reward", "learner", "staleness window"}


def test_the_gpu_learner_check_runs_its_steps_on_the_cpu_with_a_tiny_checkpoint(tmp_path):
    # the GPU check's own code (sample, sliced load, one-rank FSDP2 with per-dtype units, one bf16 update),
    # run on gloo at 32 x 32 x 5 frames: the sharded bf16 learner recomputes the sampler's log-probs exactly
    from bench.gpu_learner import measure, run_config
    from bench.workload import SMOKE_MODEL, corpus
    from editrl.policy.model import build_tiny_components, save_components

    save_components(build_tiny_components(SMOKE_MODEL, list(corpus()), kind="concat"), tmp_path / "model")
    rows, targets = measure(run_config(str(tmp_path / "model"), height=32, width=32, num_frames=5, gpus=0), "cpu")
    update = next(r for r in rows if r.name == "sharded update")
    assert update.params["tokens"] == 48 and update.metrics["onpolicy_ratio_error"] == 0.0
    # the rollout part: bf16 trajectories, all 2G rows per forward and one row per forward
    engine = {r.params["rows_per_forward"]: r for r in rows if r.name.startswith("rollout, ")}
    assert set(engine) == {4, 1} and all(r.metrics["samples_per_s"] > 0 for r in engine.values())
    assert engine[1].metrics["max_latent_diff_vs_all_rows"] < 0.05
    assert update.metrics["plan_gib"] > 0 and [t.name for t in targets] == ["gpu.sharded_onpolicy_ratio"] and targets[0].met


def test_data_plane_smoke_counts_the_bytes_of_each_storage_and_matches_the_plan():
    from bench import data_plane

    result = data_plane.run("smoke")
    by = {(m.group, m.name): m.metrics for m in result.measurements}
    big = "Wan2.1-14B 480p x 81, T = 20"
    # 480p x 81 x T = 20, G = 8, B = 8: all 21 latents in fp32 are ~1.34 GiB a group; the two-step
    # window in bf16 keeps 3 latents at 2 bytes, 1/14 of the latent bytes
    assert 1300 < by[(big, "all latents, fp32")]["group_mib"] < 1400
    assert by[(big, "window, bf16")]["group_mib"] < by[(big, "window, fp32")]["group_mib"] < by[(big, "all latents, fp32")]["group_mib"]
    measured = [m for m in result.measurements if m.group.startswith("measured")]
    assert len(measured) == 3 and all(m.metrics["plan_error"] == 0.0 for m in measured)  # the plan counts bytes exactly


def test_rollout_engine_smoke_measures_encoding_and_micro_batches():
    from bench import rollout_engine

    result = rollout_engine.run("smoke")
    names = {m.name for m in result.measurements}
    assert {"on the slot", "off the slot", "full batch", "micro-batch 2"} <= names
    micro = next(m for m in result.measurements if m.name == "micro-batch 2")
    assert micro.params["rows_per_forward"] == 2 and micro.metrics["max_latent_diff_vs_full"] < 1e-4
    assert all(r.stats.median > 0 for r in result.ratios)
