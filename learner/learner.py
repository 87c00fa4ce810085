"""The learner process's core: one Edit-GRPO update from a batch of complete groups."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from learner.advantages import group_advantages
from learner.config import LearnerConfig
from learner.loss import clipped_policy_loss
from policy.policy import EditPolicy
from policy.sampling import policy_step
from policy.sde import gaussian_kl_same_std
from protocol.rollout import Group

logger = logging.getLogger(__name__)


class Learner:
    """Owns the trainable policy, its AdamW optimizer and the policy version."""

    def __init__(self, policy: EditPolicy, config: LearnerConfig, seed: int = 0):
        self.policy = policy
        self.config = config
        self.params = policy.lora_parameters()
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.learning_rate, weight_decay=config.weight_decay, betas=config.adam_betas
        )
        self.policy_version = 0
        self.generator = torch.Generator().manual_seed(seed)
        # reward-config versions of the last update's groups (one, unless a swap happened mid-step)
        self.last_reward_config_versions: list[str] = []

    def train_step(self, groups: list[Group]) -> dict[str, float]:
        """One Edit-GRPO update (VIVA eq. 5-6) on complete groups.

        For every group and every stochastic step t, the step's log-prob of the
        recorded ``x_{t+1}`` is recomputed under the current policy (same guided
        forward as sampling), and the loss per (group, step) is
        ``pg_loss + kl_coef * KL(policy || reference)``, averaged over all
        (group, step) terms of a minibatch before each optimizer step.

        Returns:
            Metrics: losses, ratio statistics, advantage statistics, grad norm,
            timings (seconds) and the new ``policy_version``. The reward-config
            versions of the groups are logged with the step and kept in
            ``last_reward_config_versions`` (a warning when one update mixes
            rewards of several configs, e.g. across a runtime swap).

        Raises:
            ValueError: no groups, or a group sampled with a different schedule.
        """
        if not groups:
            raise ValueError("train_step needs at least one group")
        cfg = self.config
        start = time.perf_counter()
        rewards = torch.stack([g.rewards for g in groups])
        advantages = group_advantages(rewards, eps=cfg.adv_eps, std_scope=cfg.adv_std_scope, clip=cfg.adv_clip)
        eta = self.policy.config.eta
        guidance = self.policy.config.guidance_scale
        order = torch.randperm(len(groups), generator=self.generator).tolist()
        minibatches = [order[i :: cfg.updates_per_step] for i in range(cfg.updates_per_step)]
        sums: dict[str, float] = {"pg_loss": 0.0, "kl": 0.0, "ratio_mean": 0.0, "clip_frac": 0.0, "approx_kl": 0.0}
        ratio_min, ratio_max, terms, grad_norms = float("inf"), float("-inf"), 0, []
        for minibatch in (mb for mb in minibatches if mb):
            self.optimizer.zero_grad(set_to_none=True)
            steps_per_group = [torch.nonzero(groups[i].sde_mask).flatten().tolist() for i in minibatch]
            num_terms = sum(len(s) for s in steps_per_group)
            for i, steps in zip(minibatch, steps_per_group):
                group = groups[i]
                g = group.latents.shape[0]
                source = group.source_latents.expand(g, *group.source_latents.shape[1:])
                text = group.text_embeds.expand(g, *group.text_embeds.shape[1:])
                null = group.null_embeds.expand(g, *group.null_embeds.shape[1:])
                sigmas = group.sigmas.tolist()
                for t in steps:
                    out = policy_step(
                        self.policy, group.latents[:, t], sigmas[t], sigmas[t + 1], source, text, null,
                        eta, guidance, x_next=group.latents[:, t + 1],
                    )
                    pg_loss, stats = clipped_policy_loss(out.log_prob, group.log_probs[:, t], advantages[i], cfg.clip_range)
                    loss = pg_loss
                    if cfg.kl_coef > 0:
                        with torch.no_grad(), self.policy.adapter_disabled():
                            ref_mean = policy_step(
                                self.policy, group.latents[:, t], sigmas[t], sigmas[t + 1], source, text, null,
                                eta, guidance, x_next=group.latents[:, t + 1],
                            ).mean
                        kl = gaussian_kl_same_std(out.mean, ref_mean, out.std).mean()
                        loss = loss + cfg.kl_coef * kl
                        sums["kl"] += kl.item()
                    (loss / num_terms).backward()
                    sums["pg_loss"] += pg_loss.item()
                    for key in ("ratio_mean", "clip_frac", "approx_kl"):
                        sums[key] += stats[key].item()
                    ratio = torch.exp(out.log_prob.detach() - group.log_probs[:, t])
                    ratio_min, ratio_max = min(ratio_min, ratio.min().item()), max(ratio_max, ratio.max().item())
                    terms += 1
            grad_norms.append(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm).item())
            self.optimizer.step()
        self.policy_version += 1
        zero_spread = int((rewards.std(dim=1) == 0).sum())
        metrics = {key: value / max(terms, 1) for key, value in sums.items()}
        metrics.update(
            ratio_min=ratio_min,
            ratio_max=ratio_max,
            grad_norm=max(grad_norms),
            adv_mean=advantages.mean().item(),
            adv_std=advantages.std(unbiased=False).item(),
            adv_abs_max=advantages.abs().max().item(),
            groups_zero_spread=float(zero_spread),
            train_terms=float(terms),
            time_train_s=time.perf_counter() - start,
            policy_version=float(self.policy_version),
        )
        versions = sorted({g.reward_config_version for g in groups})
        self.last_reward_config_versions = versions
        if len(versions) > 1:
            logger.warning("policy version %d: one update mixes rewards of reward configs %s", self.policy_version, versions)
        logger.info("policy version %d trained on %d groups scored by reward config %s",
                    self.policy_version, len(groups), ", ".join(versions))
        if zero_spread:
            logger.info("%d of %d groups have equal rewards and carry no policy-gradient signal", zero_spread, len(groups))
        return metrics

    def save_adapter(self, directory: str | Path) -> Path:
        """Write the LoRA adapter in peft format (``adapter_model.safetensors`` and
        ``adapter_config.json``) and return the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.policy.adapter_state()
        save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt", "policy_version": str(self.policy_version)})
        peft_config = self.policy.transformer.peft_config["default"]
        peft_config.save_pretrained(str(directory))
        (directory / "editrl_adapter.json").write_text(json.dumps({"policy_version": self.policy_version}))
        return directory
