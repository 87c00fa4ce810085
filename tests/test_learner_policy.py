"""The learner's policy is the DiT alone, loaded directly in its dtype: no text encoder,
no tokenizer, no VAE (but for VACE, whose context needs one encode of a blank video),
and it trains exactly as the full policy does on the same groups."""
import pytest
import torch
from conftest import CORPUS, sample_group, tiny_policy_config

from editrl.learner.config import LearnerConfig
from editrl.learner.learner import Learner
from editrl.policy.model import build_tiny_components, load_components, save_components
from editrl.policy.policy import EditPolicy


def _checkpoint(tmp_path, kind: str):
    config = tiny_policy_config()
    save_components(build_tiny_components(config.tiny, CORPUS, shift=config.shift, seed=1, kind=kind), tmp_path / kind)
    return tmp_path / kind


def test_the_dit_alone_loads_in_bfloat16_without_the_encoders(tmp_path):
    path = _checkpoint(tmp_path, "concat")
    loaded = load_components(path, kind="concat", dtype=torch.bfloat16, encoders=False)
    assert loaded.text_encoder is None and loaded.tokenizer is None and loaded.vae is None
    assert loaded.vae_config["z_dim"] == 4 and list(loaded.vae_config["temperal_downsample"]) == [False, True]
    keep = set(loaded.transformer._keep_in_fp32_modules)
    dtypes = {name: p.dtype for name, p in loaded.transformer.named_parameters()}
    # from_pretrained(torch_dtype=bf16): bf16 as loaded, but the modules Wan keeps in fp32
    assert {d for n, d in dtypes.items() if not keep & set(n.split("."))} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if keep & set(n.split("."))} == {torch.float32}


def test_the_learners_policy_trains_as_the_full_policy_does(tmp_path):
    path = _checkpoint(tmp_path, "concat")
    config = tiny_policy_config(checkpoint=str(path))
    full = EditPolicy.from_config(config, CORPUS)
    dit_only = EditPolicy.from_config(config, CORPUS, encoders=False)
    assert dit_only.text_encoder is None and dit_only.vae is None and full.vae is not None
    dit_only.load_adapter_state(full.adapter_state())  # one LoRA initialisation for both (lora_A is random)
    groups = [sample_group(full, seed, torch.tensor([0.0, 1.0, 3.0])) for seed in range(2)]  # sampled by a "worker"
    metrics = [Learner(policy, LearnerConfig(learning_rate=1e-2, kl_coef=0.1)).train_step(groups) for policy in (full, dit_only)]
    assert {k: v for k, v in metrics[0].items() if k != "time_train_s"} == {k: v for k, v in metrics[1].items() if k != "time_train_s"}
    assert metrics[1]["onpolicy_ratio_error"] == 0.0
    full_state, dit_state = full.adapter_state(), dit_only.adapter_state()
    assert all(torch.equal(full_state[k], dit_state[k]) for k in full_state)
    with pytest.raises(RuntimeError, match="without its text encoder"):
        dit_only.encode_text(["make it brighter"])
    with pytest.raises(RuntimeError, match="without its vae"):
        dit_only.decode(groups[0].latents[:, -1])


def test_vace_keeps_the_vae_for_its_context(tmp_path):
    path = _checkpoint(tmp_path, "vace")
    config = tiny_policy_config(kind="vace", checkpoint=str(path))
    full, dit_only = EditPolicy.from_config(config, CORPUS), EditPolicy.from_config(config, CORPUS, encoders=False)
    assert dit_only.text_encoder is None and dit_only.vae is not None
    source = torch.randn(2, 4, 3, 8, 8)  # 5 frames of 32x32: latents (3, 8, 8)
    torch.testing.assert_close(dit_only.vace_context(source), full.vace_context(source), rtol=0, atol=0)


def test_the_tiny_model_built_in_code_drops_its_encoders_too():
    policy = EditPolicy.from_config(tiny_policy_config(), CORPUS, encoders=False)
    assert policy.text_encoder is None and policy.tokenizer is None and policy.vae is None
    assert policy.vae_config["z_dim"] == 4
