"""The learner process's core: one update (Edit-GRPO, DiffusionNFT or AWM) from a batch of complete groups."""
from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from editrl.learner.advantages import group_advantages
from editrl.learner.config import LearnerConfig
from editrl.learner.data_parallel import DataParallel
from editrl.learner.forward_loss import ForwardStats
from editrl.learner.forward_process import acting_steps, draw, forward_items, record_old_velocities, run_forward_items
from editrl.learner.loss import edit_grpo_objective
from editrl.learner.sharding import shard_transformer, split_sequences
from editrl.learner.work import GradientStats, StepParts, WorkItem, items_per_rank, merge_parts, pool_steps, work_items
from editrl.policy.adapter import full_value
from editrl.policy.lora_export import export_diffusers_lora
from editrl.policy.policy import EditPolicy
from editrl.policy.sampling import policy_steps
from editrl.policy.sde import StepOutput
from editrl.protocol.rollout import Group

logger = logging.getLogger(__name__)

ONPOLICY_RATIO_TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2}
"""Largest |ratio - 1| accepted on on-policy data (the first minibatch of groups
sampled with the current policy version), per weight dtype. Sampling and
recomputation share one code path, so with ``timesteps_per_forward = 1`` the
ratio is exactly 1 on CPU; the bounds leave room for batched timesteps and
non-deterministic GPU kernels. A larger error is logged as a warning."""


class Learner:
    """Owns the trainable policy, its AdamW optimizer and the policy version."""

    def __init__(self, policy: EditPolicy, config: LearnerConfig, seed: int = 0,
                 data_parallel: DataParallel | None = None):
        self.policy = policy
        self.config = config
        self.data_parallel = data_parallel
        """None: one rank; else this rank's place (:mod:`editrl.learner.data_parallel`)."""
        self.sharded = False
        """True once :meth:`shard` put the DiT, adapter and optimizer state on FSDP2 shards."""
        self.params = policy.lora_parameters()
        self.optimizer = self._optimizer()
        self.policy_version = 0
        self.generator = torch.Generator().manual_seed(seed)
        # reward-config versions of the last update's groups (one, unless a swap happened mid-step)
        self.last_reward_config_versions: list[str] = []

    def _optimizer(self) -> torch.optim.AdamW:
        cfg = self.config
        return torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, betas=cfg.adam_betas)

    def shard(self) -> int:
        """Shard the DiT and the adapter over the data-parallel ranks with FSDP2
        (:func:`editrl.learner.sharding.shard_transformer`, parameters gathered in
        ``fsdp_param_dtype``, or each in its own dtype) and rebuild the optimizer on the shards. A policy loaded with
        ``sliced=True`` then reads this rank's rows of the DiT's weights
        (:meth:`editrl.policy.policy.EditPolicy.read_weight_slices`). Every rank calls it,
        before the first update. Returns the number of sharded blocks.

        Raises:
            RuntimeError: no data-parallel group, already sharded, or the optimizer already stepped.
        """
        dp = self.data_parallel
        if dp is None or self.sharded or self.optimizer.state:
            raise RuntimeError("shard() needs a data-parallel group and an unsharded learner before its first update")
        dtype = getattr(torch, self.config.fsdp_param_dtype) if self.config.fsdp_param_dtype else None
        sliced = self.policy.defer_weights()
        blocks = shard_transformer(self.policy.transformer, dp.world_size, self.policy.device.type, dtype)
        if sliced:
            self.policy.read_weight_slices(dp.rank, dp.world_size)
        self.policy.adapter.rebind(self.policy.transformer)
        self.params = self.policy.lora_parameters()
        self.optimizer = self._optimizer()
        self.sharded = True
        logger.info("learner rank %d: DiT sharded over %d ranks (%d FSDP2 blocks, parameters gathered in %s)",
                    dp.rank, dp.world_size, blocks, dtype or "their own dtypes")
        return blocks

    def split_sequences(self) -> None:
        """Ulysses sequence parallelism of the data-parallel group's degree over the ranks
        (:func:`editrl.learner.sharding.split_sequences`); every rank calls it, before :meth:`shard`.

        Raises:
            RuntimeError: no data-parallel group with sequence parallelism, or already sharded.
            ValueError: see :func:`editrl.learner.sharding.split_sequences`.
        """
        dp = self.data_parallel
        if dp is None or dp.sequence_parallel < 2 or self.sharded:
            raise RuntimeError("split_sequences() needs an unsharded data-parallel group with sequence_parallel > 1")
        degree = dp.sequence_parallel
        split_sequences(self.policy.transformer, dp.world_size, degree, self.policy.device.type)
        logger.info("learner rank %d: sequences split over %d ranks (sequence-parallel group %d of %d)",
                    dp.rank, degree, dp.data_rank, dp.data_size)

    @property
    def is_rank_zero(self) -> bool:
        """True for the only rank or rank 0 (the one that writes files and publishes)."""
        return self.data_parallel is None or self.data_parallel.rank == 0

    def train_step(self, groups: list[Group]) -> dict[str, float]:
        """One update of the policy on complete groups, by ``config.algorithm``.

        ``edit_grpo`` (VIVA eq. 5-6): for every group and every stochastic step t, the step's
        log-prob of the recorded ``x_{t+1}`` is recomputed under the current policy (same guided
        forward as sampling, with the group's sampler spec), and the loss per (group, step) is
        :func:`editrl.learner.loss.edit_grpo_objective` (``pg_loss + kl_coef * kl_ref``), averaged
        over all (group, step) terms of a minibatch before each optimizer step.

        ``diffusion_nft`` and ``awm``: every sample's final latent is noised afresh
        (:mod:`editrl.learner.forward_process`) and the loss is the algorithm's
        (:mod:`editrl.learner.forward_loss`), averaged over each group's copies, then over groups.

        Both share the advantages (:func:`editrl.learner.advantages.group_advantages`), the
        minibatches (``updates_per_step``), gradient clipping and the policy version.

        Returns:
            Metrics. ``edit_grpo``: ``loss``, ``pg_loss``, ``kl_ref`` (exact KL to the reference
            policy), ``ratio_mean``, ``clip_frac``, ``approx_kl`` (k2) averaged over terms and
            ``ratio_min``/``ratio_max``, all of the surrogate's ratio
            (:class:`editrl.learner.loss.ObjectiveStats`); ``log_ratio_mean``/``_std`` of the raw
            log importance ratio; ``onpolicy_ratio_error`` (max ``|r - 1|`` over the first
            minibatch's groups sampled with the current version, NaN when there are none).
            Forward-process: ``loss``, ``policy_loss``, ``kl_ref`` (velocity MSE to the reference)
            and ``fm_error`` (:class:`editrl.learner.forward_loss.ForwardStats`). Always:
            ``grad_norm`` (the largest, over the minibatches, global L2 norm of the LoRA gradients
            before clipping to ``max_grad_norm``); advantage statistics; ``groups_zero_spread``;
            ``train_terms``; ``time_train_s`` (seconds) and the new ``policy_version``. The
            reward-config versions of the groups are kept in ``last_reward_config_versions`` (a
            warning when one update mixes rewards of several configs, e.g. across a runtime swap).

        Raises:
            ValueError: no groups, no stochastic step in a minibatch (``edit_grpo``), GRPO-Guard
                without recorded means, or a forward-process group without its final latent.
        """
        if not groups:
            raise ValueError("train_step needs at least one group")
        cfg = self.config
        start = time.perf_counter()
        rewards = torch.stack([g.rewards for g in groups])
        advantages = group_advantages(rewards, eps=cfg.adv_eps, std_scope=cfg.adv_std_scope, clip=cfg.adv_clip)
        order = torch.randperm(len(groups), generator=self.generator).tolist()
        minibatches = [mb for mb in (order[i :: cfg.updates_per_step] for i in range(cfg.updates_per_step)) if mb]
        updates = self._forward_updates if cfg.forward_process else self._edit_grpo_updates
        metrics, grad_norms = updates(groups, advantages, minibatches)
        self.policy_version += 1
        zero_spread = int((rewards.std(dim=1) == 0).sum())
        metrics.update(
            grad_norm=max(grad_norms),
            adv_mean=advantages.mean().item(),
            adv_std=advantages.std(unbiased=False).item(),
            adv_abs_max=advantages.abs().max().item(),
            groups_zero_spread=float(zero_spread),
            time_train_s=time.perf_counter() - start,
            policy_version=float(self.policy_version),
        )
        versions = sorted({g.reward_config_version for g in groups})
        self.last_reward_config_versions = versions
        if len(versions) > 1:
            logger.warning("policy version %d: one update mixes rewards of reward configs %s", self.policy_version, versions)
        if zero_spread:
            logger.info("%d of %d groups have equal rewards and carry no policy-gradient signal", zero_spread, len(groups))
        return metrics

    def _optimizer_step(self) -> float:
        """Clip the accumulated LoRA gradients to ``max_grad_norm``, step; the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        return float(full_value(norm))

    def _edit_grpo_updates(self, groups: list[Group], advantages: torch.Tensor,
                           minibatches: list[list[int]]) -> tuple[dict[str, float], list[float]]:
        """Edit-GRPO's optimizer steps, one per minibatch: their metrics and gradient norms."""
        total = GradientStats()
        onpolicy_errors: list[float] = []
        grad_norms = []
        for index, minibatch in enumerate(minibatches):
            self.optimizer.zero_grad(set_to_none=True)
            chosen = [groups[i] for i in minibatch]
            stats = self._minibatch_gradients(chosen, advantages[minibatch])
            errors = [e for group, e in zip(chosen, stats.ratio_error_per_group)
                      if group.policy_version == self.policy_version and not math.isnan(e)]
            if index == 0:
                onpolicy_errors = errors
            total.merge(stats)
            grad_norms.append(self._optimizer_step())
        log_ratios = torch.cat(total.log_ratios)
        metrics = {key: value / max(total.terms, 1) for key, value in total.sums.items()}
        metrics.update(
            ratio_min=total.ratio_min,
            ratio_max=total.ratio_max,
            log_ratio_mean=log_ratios.mean().item(),
            log_ratio_std=log_ratios.std(unbiased=False).item(),
            onpolicy_ratio_error=max(onpolicy_errors) if onpolicy_errors else float("nan"),
            train_terms=float(total.terms),
        )
        tolerance = ONPOLICY_RATIO_TOLERANCE[self.policy.config.dtype]
        if onpolicy_errors and metrics["onpolicy_ratio_error"] > tolerance:
            logger.warning("on-policy ratio off 1 by %.2e (tolerance %.0e for %s weights)",
                           metrics["onpolicy_ratio_error"], tolerance, self.policy.config.dtype)
        return metrics, grad_norms

    def _forward_updates(self, groups: list[Group], advantages: torch.Tensor,
                         minibatches: list[list[int]]) -> tuple[dict[str, float], list[float]]:
        """The forward-process algorithms' optimizer steps, one per minibatch (each rank runs its
        share of the items and the gradients are summed): their metrics and gradient norms."""
        cfg, dp = self.config, self.data_parallel
        if self.sharded:
            raise RuntimeError(f"learner.algorithm={cfg.algorithm} does not run on a sharded learner")
        steps = acting_steps(self.policy)
        draws = [draw(group, steps, cfg.forward_steps, self.generator) for group in groups]
        if len(minibatches) > 1:  # later minibatches see the velocity before the first step as "old"
            record_old_velocities(self.policy, groups, draws, cfg.micro_batch_samples)
        parts, grad_norms = [], []
        for minibatch in minibatches:
            self.optimizer.zero_grad(set_to_none=True)
            chosen = [groups[i] for i in minibatch]
            items = forward_items(chosen, cfg.micro_batch_samples)
            mine = dp.shard(items) if dp is not None else items
            stats = run_forward_items(self.policy, cfg, chosen, advantages[minibatch], [draws[i] for i in minibatch], mine)
            if dp is not None:
                dp.sum_gradients(self.params)
                stats = [s for rank in dp.gather(stats) for s in rank]
            parts += stats
            grad_norms.append(self._optimizer_step())
        pooled = ForwardStats.pooled(parts)
        metrics = {key: getattr(pooled, key) for key in ("loss", "policy_loss", "kl_ref", "fm_error")}
        metrics["train_terms"] = float(pooled.samples)
        return metrics, grad_norms

    def accumulate_gradients(self, groups: list[Group], advantages: torch.Tensor) -> GradientStats:
        """Add the gradient of one minibatch's loss to the LoRA parameters' ``.grad``, in this process.

        The loss is the mean over the minibatch's (group, stochastic step) terms of
        :func:`editrl.learner.loss.edit_grpo_objective`. Each group's log-probs are
        recomputed with the sampler it was sampled with (``group.sampler``), never
        with the learner's own settings. The work goes through forward and backward one
        work item at a time (:func:`editrl.learner.work.work_items`: up to
        ``timesteps_per_forward`` steps of ``micro_batch_samples`` samples), each item's
        loss weighted by its share of the group's samples, so the gradient is the whole
        minibatch's up to float rounding; the DiT's blocks are checkpointed as
        ``activation_checkpointing`` says.

        Args:
            groups: the minibatch's groups.
            advantages: ``(len(groups), G)`` fp32.

        Raises:
            ValueError: no stochastic step in any group, or ``ratio_norm =
                grpo_guard`` with a group that has no recorded means.
        """
        items, num_terms = self._work(groups)
        return self._gradient_stats(groups, self._run_items(groups, advantages, items, num_terms))

    def _work(self, groups: list[Group]) -> tuple[list[WorkItem], int]:
        """The minibatch's work items and its (group, step) term count, after checking the groups."""
        cfg = self.config
        num_terms = sum(sum(g.sampler.stochastic) for g in groups)
        if num_terms == 0:
            raise ValueError("no stochastic (trained) step in these groups")
        if cfg.ratio_norm == "grpo_guard":
            for group in groups:
                if group.means is None:
                    raise ValueError(f"ratio_norm=grpo_guard needs the transition means of group {group.task.group_id}")
        items = work_items([g.sampler.stochastic for g in groups], [g.latents.shape[0] for g in groups],
                           cfg.timesteps_per_forward, cfg.micro_batch_samples)
        return items, num_terms

    def _minibatch_gradients(self, groups: list[Group], advantages: torch.Tensor) -> GradientStats:
        """:meth:`accumulate_gradients` over the data-parallel ranks: each rank runs its share of
        the work items (a sharded rank with fewer pads with zero-weight repeats), the gradients
        are summed (all-reduce when replicated, FSDP2's reduce-scatter when sharded) and every
        rank gets every rank's statistics."""
        dp = self.data_parallel
        if dp is None:
            return self.accumulate_gradients(groups, advantages)
        items, num_terms = self._work(groups)
        mine = dp.shard(items)
        padding = [items[0]] * (items_per_rank(len(items), dp.data_size) - len(mine)) if self.sharded else []
        parts = self._run_items(groups, advantages, mine, num_terms, padding)
        if not self.sharded:
            dp.sum_gradients(self.params)
        return self._gradient_stats(groups, merge_parts(dp.gather(parts)))

    def _run_items(self, groups: list[Group], advantages: torch.Tensor, items: list[WorkItem], num_terms: int,
                   padding: list[WorkItem] = ()) -> StepParts:
        """Forward and backward of each item (loss divided by ``num_terms``), then of each
        ``padding`` item with weight 0 (collectives only); the items' statistics."""
        cfg = self.config
        ratio_norm = cfg.ratio_norm == "grpo_guard"
        parts: StepParts = defaultdict(list)
        for item, weight in [(item, 1.0) for item in items] + [(item, 0.0) for item in padding]:
            group, group_advantages_ = groups[item.group], advantages[item.group]
            rows = slice(*item.rows)
            self._set_checkpointing(self.policy.tokens_per_sequence(group.latents.shape[-3:]))
            outs, ref_means = self._forward(group, list(item.steps), rows)
            item_loss = None
            for j, (t, out) in enumerate(zip(item.steps, outs)):
                device = out.log_prob.device
                loss, term = edit_grpo_objective(
                    out.log_prob, group.log_probs[rows, t].to(device), group_advantages_[rows].to(device),
                    out.mean, group.mean(t)[rows].to(device) if ratio_norm else None,
                    None if ref_means is None else ref_means[j], out.std, group.sampler.sigmas[t + 1] - group.sampler.sigmas[t],
                    cfg.clip_range, cfg.kl_coef, ratio_norm=ratio_norm, reweight=ratio_norm and cfg.grpo_guard_reweight,
                )
                item_loss = loss * item.share if item_loss is None else item_loss + loss * item.share
                if weight:
                    parts[(item.group, t)].append((item.rows[0], term))
            (item_loss * (weight / num_terms)).backward()
        return dict(parts)

    def _gradient_stats(self, groups: list[Group], parts: StepParts) -> GradientStats:
        """The minibatch's statistics from its items' (:func:`editrl.learner.work.pool_steps`)."""
        terms, errors = pool_steps(parts)
        stats = GradientStats()
        for term in terms.values():
            stats.add(term)
        for index, group in enumerate(groups):
            if index not in errors:
                logger.warning("group %s has no stochastic step; it is not trained", group.task.group_id)
        stats.ratio_error_per_group = [errors.get(index, float("nan")) for index in range(len(groups))]
        return stats

    def _set_checkpointing(self, tokens: int) -> None:
        """Per-block activation checkpointing of the DiT on or off, as ``activation_checkpointing``
        says for sequences of ``tokens`` tokens (it only acts while gradients are recorded)."""
        mode = self.config.activation_checkpointing
        wanted = mode == "on" or (mode == "auto" and tokens >= self.config.checkpointing_min_tokens)
        transformer = self.policy.transformer
        if wanted != transformer.gradient_checkpointing:
            if wanted:
                transformer.enable_gradient_checkpointing()
            else:
                transformer.disable_gradient_checkpointing()
            logger.info("activation checkpointing %s (%d tokens per sequence, %s)", "on" if wanted else "off", tokens, mode)

    def _forward(self, group: Group, chunk: list[int], rows: slice) -> tuple[list[StepOutput], list[torch.Tensor] | None]:
        """The policy's steps at ``chunk`` for the samples ``rows`` of ``group`` (with grad),
        recomputed with the group's sampler spec, and, when the KL term is on, the
        reference policy's means there (adapter disabled, no grad)."""
        device = self.policy.device
        g = len(range(*rows.indices(group.latents.shape[0])))
        cond = [t.to(device).expand(g, *t.shape[1:]) for t in (group.source_latents, group.text_embeds, group.null_embeds)]
        xs = [group.latent(t)[rows].to(device) for t in chunk]
        x_nexts = [group.latent(t + 1)[rows].to(device) for t in chunk]
        outs = policy_steps(self.policy, group.sampler, chunk, xs, *cond, x_nexts=x_nexts, null_grad=self.config.cfg_null_grad)
        for t, out in zip(chunk, outs):
            if out.log_prob is None:
                raise ValueError(f"step {t} of group {group.task.group_id} is deterministic and cannot be trained")
        if self.config.kl_coef <= 0:
            return outs, None
        with torch.no_grad(), self.policy.adapter_disabled():
            ref_means = [out.mean for out in policy_steps(self.policy, group.sampler, chunk, xs, *cond, x_nexts=x_nexts)]
        return outs, ref_means

    def save_adapter(self, directory: str | Path) -> Path:
        """Write the LoRA adapter in peft format (``adapter_model.safetensors`` and
        ``adapter_config.json``) and in the diffusers format that a Wan pipeline's
        ``load_lora_weights`` reads (``pytorch_lora_weights.safetensors``, see
        :func:`editrl.policy.lora_export.export_diffusers_lora`), and ``editrl_adapter.json``
        with the policy version and the denoising steps the adapter acts on
        (``active_steps``, null for all); return the directory. A sharded learner's ranks
        all call it (the adapter is gathered); rank 0 writes."""
        directory = Path(directory)
        state = self.policy.adapter_state()
        if not self.is_rank_zero:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt", "policy_version": str(self.policy_version)})
        peft_config = self.policy.transformer.peft_config["default"]
        peft_config.save_pretrained(str(directory))
        export_diffusers_lora(self.policy, directory, state)
        (directory / "editrl_adapter.json").write_text(json.dumps(
            {"policy_version": self.policy_version, "active_steps": self.policy.config.lora.active_steps}
        ))
        return directory

