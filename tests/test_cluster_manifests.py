"""The Kubernetes manifests under cluster/ parse, have the structure KubeRay
expects, and agree with the run preset and the Serve config about which custom
resource, label, Service and port each editrl process uses."""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from urllib.parse import urlparse

import yaml

from editrl.cluster.config import load_train_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
IMAGE_ROOT = "/home/ray/editrl/"  # where cluster/Dockerfile puts the project


def _documents(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


def _custom_resources(group: dict) -> dict[str, float]:
    # KubeRay writes `--resources=<value>` into the pod's shell command, so the value is
    # a double-quoted shell word holding the JSON object, read here as the shell reads it
    (word,) = shlex.split(group["rayStartParams"]["resources"])
    return json.loads(word)


def _image_path(path: str) -> Path:
    assert path.startswith(IMAGE_ROOT), path
    return ROOT / path[len(IMAGE_ROOT):]


def test_rayjob_has_a_head_three_worker_groups_and_gcs_fault_tolerance():
    job = _documents("rayjob.yaml")["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True  # more rollout actors bring more rollout pods

    ft = cluster["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == "editrl-redis:6379"
    secret = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "editrl-redis", "key": "password"}

    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"rollout", "learner", "reward"}
    assert {name: _custom_resources(g) for name, g in groups.items()} == {
        "rollout": {"rollout": 1}, "learner": {"learner": 1, "driver": 1}, "reward": {"reward": 1}}
    for name in ("rollout", "learner"):
        assert groups[name]["rayStartParams"]["num-gpus"] == "1"
        (container,) = groups[name]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert groups["learner"]["maxReplicas"] == 1
    assert groups["rollout"]["minReplicas"] <= groups["rollout"]["replicas"] <= groups["rollout"]["maxReplicas"]


def test_entrypoint_places_the_driver_on_the_learner_and_trains_the_cluster_preset():
    docs = _documents("rayjob.yaml")
    spec = docs["RayJob"]["spec"]
    assert json.loads(spec["entrypointResources"]) == {"driver": 1} and "entrypointNumGpus" not in spec
    serve_step, train_step = [part.split() for part in spec["entrypoint"].split("&&")]
    assert serve_step[:3] == ["serve", "run", "--non-blocking"] and _image_path(serve_step[3]) == CLUSTER / "reward_serve.yaml"
    assert train_step[:2] == ["editrl", "train"]
    options = dict(zip(train_step[2::2], train_step[3::2]))
    assert options["--address"] == "auto" and options["--run-dir"].startswith("/data/")
    preset = _image_path(options["--config"])
    assert preset == ROOT / "configs" / "cluster.yaml"

    config = load_train_config(preset)
    assert config.topology.rollout.resources == {"rollout": 1} and config.topology.rollout.gpus == 1
    # the run reaches the reward replicas through the Service in front of the reward pods
    service = docs["Service"]
    url = urlparse(config.reward_server.url)
    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"]
    groups = {g["groupName"]: g for g in docs["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    reward_labels = groups["reward"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= reward_labels.items()
    for other in ("rollout", "learner"):
        assert not service["spec"]["selector"].items() <= groups[other]["template"].get("metadata", {}).get("labels", {}).items()


def test_serve_config_puts_the_reward_server_on_the_reward_group():
    from ray.serve.schema import ServeDeploySchema

    from editrl.reward_server.serve_app import build_app

    raw = yaml.safe_load((CLUSTER / "reward_serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert app.import_path == "editrl.reward_server.serve_app:build_app"
    (override,) = app.deployments
    assert override.name == "RewardServer" and override.ray_actor_options.resources == {"reward": 1}
    assert schema.http_options.port == urlparse(load_train_config(ROOT / "configs" / "cluster.yaml").reward_server.url).port
    # the deployment the override names is the one the builder makes, from a config that exists
    application = build_app({**app.args, "config": str(_image_path(app.args["config"]))})
    assert application._bound_deployment.name == override.name


def test_redis_for_gcs_fault_tolerance_matches_the_rayjob():
    docs = _documents("redis.yaml")
    service, deployment = docs["Service"], docs["Deployment"]
    host, port = _documents("rayjob.yaml")["RayJob"]["spec"]["rayClusterSpec"]["gcsFaultToleranceOptions"]["redisAddress"].split(":")
    assert service["metadata"]["name"] == host and service["spec"]["ports"][0]["port"] == int(port)
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    password = next(e for e in container["env"] if e["name"] == "REDIS_PASSWORD")["valueFrom"]["secretKeyRef"]
    assert password == {"name": "editrl-redis", "key": "password"}
    assert "$(REDIS_PASSWORD)" in container["args"]


def _pod(group: dict) -> dict[str, float]:
    """What one pod of a worker group offers Ray: CPUs and GPUs (as its container asks them) and
    its custom resources; and its memory in bytes."""
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    memory = str(limits["memory"])
    assert memory.endswith("Gi"), memory
    return {"CPU": float(limits["cpu"]), "GPU": float(limits.get("nvidia.com/gpu", 0)),
            "memory": float(memory[:-2]) * 2**30, **_custom_resources(group)}


def test_the_worker_groups_can_hold_the_processes_the_cluster_preset_and_the_serve_app_ask_for():
    from editrl.cluster.plan import plan_run

    config = load_train_config(ROOT / "configs" / "cluster.yaml")
    groups = {g["groupName"]: g for g in _documents("rayjob.yaml")["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    pods = {name: _pod(group) for name, group in groups.items()}
    for name, group in groups.items():  # Ray sees the GPUs the container gets
        assert float(group["rayStartParams"]["num-gpus"]) == pods[name]["GPU"], name

    def fit(pod: dict, ask: dict[str, float]) -> int:
        """How many processes asking ``ask`` one pod holds."""
        return min(int(pod.get(key, 0.0) // value) for key, value in ask.items() if value > 0)

    topology = config.topology
    per_pod = fit(pods["rollout"], topology.rollout.ask())
    assert per_pod >= 1
    assert groups["rollout"]["replicas"] * per_pod >= topology.rollout.workers  # the starting pods hold the starting workers
    assert groups["learner"]["maxReplicas"] * fit(pods["learner"], topology.learner.ask()) >= topology.learner.ranks
    assert pods["learner"]["driver"] >= 1  # the job's driver (entrypointResources) sits beside the learner

    # the Serve app runs the replicas the topology names, each asking what the topology says
    serve = yaml.safe_load((CLUSTER / "reward_serve.yaml").read_text())["applications"][0]
    options = serve["deployments"][0]["ray_actor_options"]
    per_replica = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options["resources"]}
    assert serve["args"]["num_replicas"] == topology.reward.replicas
    assert {key: value for key, value in per_replica.items() if value > 0} == topology.reward.ask()
    assert groups["reward"]["maxReplicas"] * fit(pods["reward"], per_replica) >= topology.reward.replicas

    # pod memory follows editrl plan for the processes that live in host memory (the reward replicas
    # on CPU; the rollout workers' and learner's own peaks are GPU memory, checked by the plan itself)
    plan = {p.kind: p for p in plan_run(config).processes}
    reward = plan["reward replica"]
    assert reward.device == "cpu"
    assert pods["reward"]["memory"] >= fit(pods["reward"], per_replica) * reward.peak, (pods["reward"]["memory"], reward.peak)
