"""The Ray Serve application: its construction, and two replicas following a config change through Redis."""
from __future__ import annotations

import os
import time

import httpx
import pytest
import yaml
from reward_servers import REPO_ROOT, app_server

from editrl.cluster.reward_process import free_port
from editrl.reward_server.serve_app import RewardServerReplica, build_app

TOKEN = "serve-admin-token"


def test_application_construction_without_starting_serve(tmp_path, redis_url, redis_prefix):
    from ray import serve

    config = {"redis_url": redis_url, "redis_prefix": redis_prefix, "reward": {"version": "serve-1", "backend": "pixel"}}
    path = tmp_path / "server.yaml"
    path.write_text(yaml.safe_dump(config))
    app = build_app({"config": str(path), "num_replicas": 3, "num_cpus": 0.5})
    assert isinstance(app, serve.Application)
    deployment = app._bound_deployment
    assert deployment.name == "RewardServer" and deployment.num_replicas == 3
    assert deployment.ray_actor_options["num_cpus"] == 0.5
    with pytest.raises(ValueError, match="need a shared config registry"):
        build_app({"config": str(REPO_ROOT / "configs" / "reward_server.yaml"), "num_replicas": 2})
    with pytest.raises(ValueError, match="num_replicas"):
        build_app({"num_replicas": 0})
    # what a replica builds when Serve starts it: the reward server app, served here by uvicorn
    (bound_config,) = deployment.init_args
    with app_server(RewardServerReplica(bound_config).__serve_build_asgi_app__()) as url:
        assert httpx.get(f"{url}/v1/config").json()["version"] == "serve-1"


def test_shipped_serve_config_names_a_loadable_builder():
    serve_config = yaml.safe_load((REPO_ROOT / "configs" / "reward_server_serve.yaml").read_text())
    (application,) = serve_config["applications"]
    assert application["import_path"] == "editrl.reward_server.serve_app:build_app"
    server_config = yaml.safe_load((REPO_ROOT / application["args"]["config"]).read_text())
    assert server_config["redis_url"] and application["args"]["num_replicas"] == 2


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("EDITRL_TEST_RAY_SERVE") != "1",
                    reason="starts Ray and Serve (about 45 s on 2 busy cores); set EDITRL_TEST_RAY_SERVE=1 to run it")
def test_two_serve_replicas_follow_a_config_change(tmp_path, redis_url, redis_prefix, monkeypatch):
    import ray
    from ray import serve

    monkeypatch.setenv("EDITRL_REWARD_ADMIN_TOKEN", TOKEN)  # inherited by the replicas' processes
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"EDITRL_REWARD_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(REPO_ROOT)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = {"redis_url": redis_url, "redis_prefix": redis_prefix, "config_poll_s": 30.0,
                  "reward": {"version": "serve-1", "backend": "pixel"}}
        path = tmp_path / "server.yaml"
        path.write_text(yaml.safe_dump(config))
        serve.run(build_app({"config": str(path), "num_replicas": 2, "num_cpus": 0.5}), name="reward", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        new = {"version": "serve-2", "backend": "pixel", "weights": {"preservation": 1.0}}
        put = httpx.put(f"{url}/v1/config", json=new, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert put.status_code == 200 and put.json()["revision"] == 2
        seen: dict[str, str] = {}
        deadline = time.monotonic() + 20
        while (len(seen) < 2 or set(seen.values()) != {"serve-2"}) and time.monotonic() < deadline:
            body = httpx.get(f"{url}/v1/config", timeout=10).json()
            seen[body["replica"]] = body["version"]
            time.sleep(0.02)  # poll interval
        assert len(seen) == 2 and set(seen.values()) == {"serve-2"}, f"two replicas on serve-2 within 20 s, got {seen}"
    finally:
        serve.shutdown()
        ray.shutdown()
