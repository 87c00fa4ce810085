"""A learner process as the learner actor runs it, for ``tests/test_plan.py``: load the DiT of
a checkpoint (no encoders), take one update on groups of random latents, print the
process's peak RSS (VmHWM) and its RSS after loading, in MiB, as JSON; with
``topology.learner.gpus`` the learner runs on CUDA and the peak CUDA memory allocated during the
update and the memory allocated after loading are printed too.

Usage: python tests/plan_learner_peak.py CONFIG_JSON
"""
import json
import sys


def status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def main() -> None:
    import torch

    from editrl.cluster.config import TrainConfig
    from editrl.learner.learner import Learner
    from editrl.policy.policy import EditPolicy
    from editrl.protocol.rollout import Group, GroupTask, trained_positions

    config = TrainConfig.model_validate(json.loads(sys.argv[1]))
    torch.set_num_threads(config.learner.torch_threads)
    cuda = config.topology.learner.gpus > 0
    policy = EditPolicy.from_config(config.policy, [], encoders=False, device="cuda" if cuda else "cpu")
    generator = torch.Generator().manual_seed(0)
    c = policy.vae_config["z_dim"]
    spatial = 2 ** len(policy.vae_config["temperal_downsample"])
    temporal = 2 ** sum(policy.vae_config["temperal_downsample"])
    p = config.policy
    latent = (c, 1 + (p.num_frames - 1) // temporal, p.height // spatial, p.width // spatial)
    g, steps, dim = config.group_size, p.num_steps, policy.transformer.config.text_dim
    specs = [policy.sampler_spec(seed=i) for i in range(config.prompts_per_step)]
    positions = [trained_positions(spec.stochastic) for spec in specs]  # what a rollout worker sends
    groups = [Group(
        task=GroupTask(f"g{i}", f"p{i}", "edit", "unused.mp4", i, g), policy_version=0, worker_id=0,
        latents=torch.randn(g, len(positions[i]), *latent, generator=generator), log_probs=torch.zeros(g, steps),
        latent_steps=positions[i],
        sampler=specs[i], source_latents=torch.randn(1, *latent, generator=generator),
        text_embeds=torch.randn(1, p.max_text_tokens, dim, generator=generator),
        null_embeds=torch.randn(1, p.max_text_tokens, dim, generator=generator),
        rewards=torch.arange(g, dtype=torch.float32), reward_dimensions={}, reward_config_version="plan",
    ) for i in range(config.prompts_per_step)]
    loaded = status_mib("VmRSS")
    learner = Learner(policy, config.learner)
    result = {"loaded_rss_mib": loaded}
    if cuda:
        torch.cuda.synchronize()
        result["cuda_loaded_mib"] = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    learner.train_step(groups)
    if cuda:
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps({**result, "peak_rss_mib": status_mib("VmHWM")}))


if __name__ == "__main__":
    main()
