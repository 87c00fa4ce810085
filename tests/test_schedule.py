"""Which steps are stochastic and trained: the timestep fraction, the SDE window in
its three placements, trajectories that share their ODE prefix, and the steps the adapter acts on."""
import pytest
import torch
from conftest import CORPUS, structured_clip, tiny_policy_config

from editrl.policy.config import LoraSettings, SdeWindowSettings
from editrl.policy.policy import EditPolicy
from editrl.policy.sampling import policy_step, sample_trajectories
from editrl.policy.schedule import fraction_steps, stochastic_steps, window_start
from editrl.protocol.rollout import SamplerSpec


def _on(mask: list[bool]) -> list[int]:
    return [i for i, m in enumerate(mask) if m]


def test_fraction_selects_the_first_steps():
    # int(0.9 * 10) = 9, int(0.99 * 20) = 19 (Flow-GRPO), int(0.75 * 4) = 3, at least one step
    assert _on(fraction_steps(10, 0.9)) == list(range(9))
    assert _on(fraction_steps(20, 0.99)) == list(range(19))
    assert _on(fraction_steps(4, 0.75)) == [0, 1, 2]
    assert _on(fraction_steps(4, 0.1)) == [0]
    assert _on(fraction_steps(4, 1.0)) == [0, 1, 2, 3]


def test_fixed_window_selects_exactly_its_steps():
    assert _on(stochastic_steps(10, 0.9, window_size=2, position="fixed", start=3)) == [3, 4]
    # the last admissible start keeps the window inside the 9 eligible steps
    assert _on(stochastic_steps(10, 0.9, window_size=2, position="fixed", start=7)) == [7, 8]
    with pytest.raises(ValueError, match="start"):
        stochastic_steps(10, 0.9, window_size=2, position="fixed", start=8)
    with pytest.raises(ValueError, match="size"):
        stochastic_steps(10, 0.9, window_size=10)


def test_scheduled_window_slides_with_the_policy_version_and_stops_at_the_end():
    # 9 eligible steps, size 2 -> last start 7; start 1, stride 2, every 3 versions:
    # versions 0-2 -> 1, 3-5 -> 3, 6-8 -> 5, 9-11 -> 7, 12 -> min(9, 7) = 7
    starts = [window_start("scheduled", 9, 2, start=1, stride=2, every=3, policy_version=v) for v in range(13)]
    assert starts == [1, 1, 1, 3, 3, 3, 5, 5, 5, 7, 7, 7, 7]
    assert _on(stochastic_steps(10, 0.9, 2, "scheduled", 1, 2, 3, policy_version=4)) == [3, 4]


def test_random_window_is_a_function_of_the_group_seed_and_stays_admissible():
    masks = {seed: stochastic_steps(10, 0.9, 3, "random", seed=seed) for seed in range(200)}
    for seed, mask in masks.items():
        on = _on(mask)
        assert len(on) == 3 and on == list(range(on[0], on[0] + 3)) and on[-1] <= 8
        assert stochastic_steps(10, 0.9, 3, "random", seed=seed) == mask
    # every admissible start (0 .. 6) occurs
    assert sorted({_on(m)[0] for m in masks.values()}) == list(range(7))


def test_policy_steps_follow_the_config():
    policy = EditPolicy.from_config(tiny_policy_config(), CORPUS)
    assert policy.sde_steps() == [True, True, True, False]
    windowed = EditPolicy.from_config(
        tiny_policy_config(sde_window=SdeWindowSettings(size=1, position="scheduled", start=0, stride=1, every=2)), CORPUS
    )
    assert [_on(windowed.sde_steps(policy_version=v)) for v in range(7)] == [[0], [0], [1], [1], [2], [2], [2]]
    ode = EditPolicy.from_config(tiny_policy_config(sampler="ode"), CORPUS)
    assert ode.config.eta == 0.0 and ode.sde_steps() == [False] * 4


def test_a_window_that_does_not_fit_the_fraction_is_refused_by_the_config():
    # 4 steps, fraction 0.75 -> 3 eligible steps: size 3 fits at start 0, not at start 1; size 4 never
    tiny_policy_config(sde_window=SdeWindowSettings(size=3, start=0))
    with pytest.raises(ValueError, match="does not fit"):
        tiny_policy_config(sde_window=SdeWindowSettings(size=3, start=1, position="fixed"))
    with pytest.raises(ValueError, match="does not fit"):
        tiny_policy_config(sde_window=SdeWindowSettings(size=4))


def _spec(policy: EditPolicy, mask: list[bool]) -> SamplerSpec:
    """Flow-SDE with eta 0.7 and CFG 2.0 on the steps of ``mask``."""
    return SamplerSpec.build("flow_sde", 0.7, 2.0, policy.sigmas(), mask)


def _inputs(policy: EditPolicy):
    source = policy.encode_video(structured_clip(5, 32)[None])
    return source, policy.encode_text([CORPUS[1]]), policy.encode_text([""])


@pytest.mark.parametrize("shared", [True, False])
def test_window_trajectories_share_the_ode_prefix_only_when_asked(shared):
    config = tiny_policy_config(num_steps=5, sde_fraction=0.8)
    policy = EditPolicy.from_config(config, CORPUS)
    mask = stochastic_steps(5, 0.8, window_size=2, position="fixed", start=2)  # steps 2 and 3
    traj = sample_trajectories(
        policy, *_inputs(policy), 3, _spec(policy, mask), torch.Generator().manual_seed(0), shared_initial_noise=shared,
    )
    assert list(traj.spec.stochastic) == mask
    assert torch.isfinite(traj.log_probs[:, [2, 3]]).all() and torch.isnan(traj.log_probs[:, [0, 1, 4]]).all()
    latents = traj.latents  # (G, T + 1, ...): x_0 .. x_2 are before the window's first step
    for t in range(6):
        same = all(torch.equal(latents[0, t], latents[i, t]) for i in (1, 2))
        assert same == (shared and t <= 2), t


def test_cps_trajectory_does_not_train_its_deterministic_last_step():
    # all four steps requested stochastic; CPS's last step (sigma_next = 0) has s = 0
    policy = EditPolicy.from_config(tiny_policy_config(sampler="cps", sde_fraction=1.0), CORPUS)
    traj = sample_trajectories(policy, *_inputs(policy), 2, policy.sampler_spec(), torch.Generator().manual_seed(1))
    assert list(traj.spec.stochastic) == [True, True, True, False]
    assert torch.isnan(traj.log_probs[:, 3]).all() and torch.isfinite(traj.log_probs[:, :3]).all()


def test_recorded_means_are_the_transition_means():
    policy = EditPolicy.from_config(tiny_policy_config(), CORPUS)
    traj = sample_trajectories(policy, *_inputs(policy), 2, policy.sampler_spec(), torch.Generator().manual_seed(2), record_means=True)
    assert traj.means.shape == traj.latents[:, 1:].shape
    # the deterministic last step lands on its mean
    assert torch.equal(traj.means[:, 3], traj.latents[:, 4])


def test_adapter_active_steps_must_cover_every_trainable_step():
    # 4 steps, fraction 0.75: steps 0-2 can be trained
    assert tiny_policy_config(lora=LoraSettings(rank=4, alpha=8, active_steps=3)).adapter_acts_at(2)
    with pytest.raises(ValueError, match="step 2 can be stochastic"):
        tiny_policy_config(lora=LoraSettings(rank=4, alpha=8, active_steps=2))
    # a fixed window at steps 0-1 needs the adapter on steps 0-1 only
    config = tiny_policy_config(sde_window=SdeWindowSettings(size=2, start=0, position="fixed"),
                                lora=LoraSettings(rank=4, alpha=8, active_steps=2))
    assert [config.adapter_acts_at(t) for t in range(4)] == [True, True, False, False]
    # a random window can reach step 2, so the same adapter steps are refused
    with pytest.raises(ValueError, match="step 2 can be stochastic"):
        tiny_policy_config(sde_window=SdeWindowSettings(size=2, position="random"), lora=LoraSettings(rank=4, alpha=8, active_steps=2))
    with pytest.raises(ValueError, match="exceeds num_steps"):
        tiny_policy_config(lora=LoraSettings(rank=4, alpha=8, active_steps=5))
    # the ode sampler trains nothing, so any adapter steps are accepted
    assert not tiny_policy_config(sampler="ode", lora=LoraSettings(rank=4, alpha=8, active_steps=1)).adapter_acts_at(1)


def _with_nonzero_adapter(config) -> EditPolicy:
    policy = EditPolicy.from_config(config, CORPUS)
    with torch.no_grad():  # B = 0 at init would make the adapter an identity
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    return policy


def test_adapter_acts_only_on_its_steps_and_the_base_model_runs_the_rest():
    window = SdeWindowSettings(size=1, start=0, position="fixed")
    limited = _with_nonzero_adapter(tiny_policy_config(sde_window=window, lora=LoraSettings(rank=4, alpha=8, active_steps=1)))
    everywhere = _with_nonzero_adapter(tiny_policy_config(sde_window=window))
    source, text, null = _inputs(limited)
    spec = limited.sampler_spec()
    traj = sample_trajectories(limited, source, text, null, 2, spec, torch.Generator().manual_seed(4))
    same = sample_trajectories(everywhere, source, text, null, 2, spec, torch.Generator().manual_seed(4))
    # step 0 (stochastic, trained) is the adapted policy's in both
    assert torch.equal(traj.latents[:, 1], same.latents[:, 1])
    assert torch.equal(traj.log_probs[:, 0], same.log_probs[:, 0])
    # steps 1-3: the base model's Euler steps from the recorded x_1
    x = traj.latents[:, 1]
    g = x.shape[0]
    with limited.adapter_disabled():
        for t in range(1, 4):
            x = policy_step(limited, spec, t, x, source.expand(g, *source.shape[1:]), text.expand(g, -1, -1),
                            null.expand(g, -1, -1)).x_next
            assert torch.equal(traj.latents[:, t + 1], x), t
    # and the adapter does change those steps when it acts on them
    assert not torch.allclose(same.latents[:, -1], traj.latents[:, -1], atol=1e-4)


def test_sampling_refuses_a_stochastic_step_the_adapter_does_not_act_on():
    policy = EditPolicy.from_config(tiny_policy_config(sampler="ode", lora=LoraSettings(rank=4, alpha=8, active_steps=1)), CORPUS)
    with pytest.raises(ValueError, match=r"steps \[1\] are stochastic but the adapter does not act"):
        sample_trajectories(policy, *_inputs(policy), 2, _spec(policy, [True, True, False, False]), torch.Generator().manual_seed(0))


def test_antithetic_pairs_draw_opposite_noise_and_have_equal_first_step_log_probs():
    config = tiny_policy_config(sde_window=SdeWindowSettings(size=2, start=0, position="fixed"), antithetic=True)
    policy = EditPolicy.from_config(config, CORPUS)
    traj = sample_trajectories(
        policy, *_inputs(policy), 4, policy.sampler_spec(), torch.Generator().manual_seed(5),
        shared_initial_noise=True, antithetic=True, record_means=True,
    )
    for t in (0, 1):  # stochastic steps: x_{t+1} - mean_t is +noise for sample i and -noise for sample i + 2
        step_noise = traj.latents[:, t + 1] - traj.means[:, t]
        assert step_noise.abs().max() > 0.01
        torch.testing.assert_close(step_noise[:2], -step_noise[2:], rtol=0, atol=1e-5)
    # step 0 starts every sample from the same x_0, so a pair sits symmetrically around one mean
    # and a Gaussian gives both halves the same log-prob
    torch.testing.assert_close(traj.log_probs[:2, 0], traj.log_probs[2:, 0], rtol=0, atol=1e-5)
    assert not torch.allclose(traj.latents[0, -1], traj.latents[2, -1])
    with pytest.raises(ValueError, match="even group size"):
        sample_trajectories(policy, *_inputs(policy), 3, policy.sampler_spec(), torch.Generator().manual_seed(5), antithetic=True)
