"""The exported LoRA adapter: a diffusers WanPipeline loads it with
load_lora_weights and, with the same initial noise, sigmas and CFG, reproduces the
policy's deterministic (ODE) sampling."""
import numpy as np
import torch
from conftest import CORPUS, tiny_policy_config
from diffusers import WanPipeline

from editrl.learner.config import LearnerConfig
from editrl.learner.learner import Learner
from editrl.policy.lora_export import diffusers_lora_state
from editrl.policy.model import build_tiny_components, save_components
from editrl.policy.policy import EditPolicy
from editrl.policy.sampling import sample_trajectories


def _randomise_lora(policy: EditPolicy, seed: int = 0, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def test_lora_b_carries_the_alpha_over_rank_scale():
    # rank 4, alpha 8: B is multiplied by 2, A is kept
    state = {"blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 3), "blocks.0.attn1.to_q.lora_B.weight": torch.full((3, 4), 0.5)}
    out = diffusers_lora_state(state, rank=4, alpha=8.0)
    assert torch.equal(out["blocks.0.attn1.to_q.lora_A.weight"], torch.ones(4, 3))
    assert torch.equal(out["blocks.0.attn1.to_q.lora_B.weight"], torch.ones(3, 4))


def test_exported_lora_reproduces_the_policy_in_a_diffusers_wan_pipeline(tmp_path):
    # text-to-video kind (WanPipeline has no source input); same initial noise, the same
    # FlowMatchEuler sigmas, the same CFG; the policy samples with its ODE step
    path = tmp_path / "ckpt"
    config = tiny_policy_config(kind="t2v", checkpoint=str(path))
    save_components(build_tiny_components(config.tiny, CORPUS, shift=config.shift, seed=1, kind="t2v"), path)
    policy = EditPolicy.from_config(config, CORPUS)
    _randomise_lora(policy)
    text, null = policy.encode_text([CORPUS[0]]), policy.encode_text([""])
    unused_source = torch.zeros(1, 4, 3, 8, 8)
    traj = sample_trajectories(policy, unused_source, text, null, 1, policy.sampler_spec(deterministic=True), torch.Generator().manual_seed(5))
    adapter_dir = Learner(policy, LearnerConfig()).save_adapter(tmp_path / "adapter")
    assert (adapter_dir / "adapter_model.safetensors").is_file()  # peft format alongside

    pipe = WanPipeline.from_pretrained(path, local_files_only=True)
    pipe.load_lora_weights(adapter_dir)
    attached = sum(1 for name, _ in pipe.transformer.named_modules() if name.endswith("lora_A"))
    assert attached == policy.num_lora_modules == 16

    def run(**kwargs):
        return pipe(
            prompt=CORPUS[0], negative_prompt="", height=32, width=32, num_frames=5, num_inference_steps=4,
            guidance_scale=config.guidance_scale, latents=traj.latents[:, 0].clone(),
            max_sequence_length=config.max_text_tokens, **kwargs,
        ).frames

    latents = run(output_type="latent")
    torch.testing.assert_close(latents, traj.latents[:, -1], rtol=1e-5, atol=1e-5)
    frames = run(output_type="np")  # decoded, float in [0, 1]
    ours = policy.decode(traj.latents[:, -1]).astype(np.float32) / 255.0
    assert np.abs(frames - ours).max() <= 1.0 / 255.0 + 1e-6
    # without the adapter the pipeline's edit is a different one
    pipe.unload_lora_weights()
    assert (run(output_type="latent") - traj.latents[:, -1]).abs().max() > 1e-2
