"""Internal-VLM backend (``internal_vlm``): an open VLM's soft Yes/No per dimension, as in ReViSE.

For each item and each configured dimension the VLM sees ``num_frames`` frames
of the source and of the edited video (longer side <= ``max_side`` px) and one
Yes/No question (:mod:`.vlm_questions`); ``p_edit = sigmoid(l_yes - l_no)``.
With ``relative`` the same question is asked about the self-comparison pair
(source, source), and the score is ``5 (1 + p_edit - p_self)`` (``shifted``) or
``10 clip(p_edit - p_self, 0, 1)`` (``clipped``); without it ``10 p_edit``.

Batching that pays: all prompts of a batch go to the engine together, and the
self pair depends only on (source, instruction, dimension), so the G samples of
a GRPO group share one self-pair prompt; self-pair margins are also kept in a
small LRU across batches. Engines: :class:`~.vlm_engines.TransformersEngine`,
:class:`~.vlm_engines.VLLMEngine` (local, batched by the server) and
:class:`~.vllm_http.VLLMHTTPEngine` (remote, concurrency-capped).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from editrl.reward_server.backends.base import BackendResult, ScoreInput
from editrl.reward_server.backends.frames import sampled_images
from editrl.reward_server.backends.specs import InternalVLMSpec
from editrl.reward_server.backends.vlm_questions import YesNoPrompt, question, sigmoid, to_score

logger = logging.getLogger(__name__)

PROTOCOL_REVISION = "r1"
_SELF_CACHE_SIZE = 4096


@dataclass
class _Slot:
    """Where one dimension's margins come from: prompt indices, or the self-pair cache key."""

    edit_at: int
    self_at: int | None = None
    self_key: str | None = None
    self_value: float | None = None


class InternalVLMBackend:
    """ReViSE-style scoring behind the :class:`editrl.reward_server.backends.base.Backend` interface.

    Args:
        spec: dimensions, frames, reasoning and score mapping.
        engine: an object with ``remote`` and either ``margins(prompts) -> list[float]``
            (local) or ``async amargins(prompts) -> list[float | str]`` (remote; a
            string is that prompt's error).
    """

    name = "internal_vlm"

    def __init__(self, spec: InternalVLMSpec, engine: Any) -> None:
        self.spec = spec
        self.engine = engine
        self.remote = bool(engine.remote)
        self.version = f"revise-{PROTOCOL_REVISION}/{spec.engine}:{spec.model}"
        self.dimensions = spec.dimension_names()
        self.fingerprint = f"{self.version}|{spec.fingerprint()}"
        self._self_margins: OrderedDict[str, float] = OrderedDict()

    async def aclose(self) -> None:
        if hasattr(self.engine, "aclose"):
            await self.engine.aclose()
        elif hasattr(self.engine, "close"):
            self.engine.close()

    def _plan(self, items: list[ScoreInput]) -> tuple[list[YesNoPrompt], list[dict[str, _Slot]]]:
        """The prompts to run, and per item per dimension where its edit and self margins come from."""
        spec = self.spec
        prompts: list[YesNoPrompt] = []
        self_index: dict[str, int] = {}
        plans = []
        for item in items:
            source = tuple(sampled_images(item.source, spec.num_frames, spec.max_side))
            edited = tuple(sampled_images(item.edited, spec.num_frames, spec.max_side))
            digest = hashlib.sha256(item.source.tobytes() + str(item.source.shape).encode()).hexdigest()
            plan: dict[str, _Slot] = {}
            for dimension in spec.dimensions:
                text = question(dimension, item.instruction, reasoning=spec.reasoning_tokens > 0)
                prompts.append(YesNoPrompt(source, edited, text))
                slot = _Slot(edit_at=len(prompts) - 1)
                if spec.relative:
                    slot.self_key = hashlib.sha256(f"{digest}|{dimension}|{item.instruction}".encode()).hexdigest()
                    slot.self_value = self._self_margins.get(slot.self_key)
                    if slot.self_value is None:
                        if slot.self_key not in self_index:
                            prompts.append(YesNoPrompt(source, source, text))
                            self_index[slot.self_key] = len(prompts) - 1
                        slot.self_at = self_index[slot.self_key]
                plan[dimension] = slot
            plans.append(plan)
        return prompts, plans

    async def _margins(self, prompts: list[YesNoPrompt]) -> list[float | str]:
        if self.remote:
            return await self.engine.amargins(prompts)
        return list(await asyncio.to_thread(self.engine.margins, prompts))

    async def score_batch(self, items: list[ScoreInput]) -> list[BackendResult]:
        """Score items in order; a prompt the engine could not answer fails its item only."""
        prompts, plans = await asyncio.to_thread(self._plan, items)
        margins = await self._margins(prompts) if prompts else []
        for plan in plans:  # remember the self pairs computed now
            for slot in plan.values():
                if slot.self_at is not None and not isinstance(margins[slot.self_at], str):
                    self._self_margins[slot.self_key] = margins[slot.self_at]  # type: ignore[index]
        results = []
        for item, plan in zip(items, plans):
            dimensions: dict[str, float | None] = {}
            errors = []
            for dimension, slot in plan.items():
                edit = margins[slot.edit_at]
                reference: float | str | None = None
                if slot.self_key is not None:
                    reference = margins[slot.self_at] if slot.self_at is not None else slot.self_value
                    if slot.self_key in self._self_margins:
                        self._self_margins.move_to_end(slot.self_key)
                failed = [m for m in (edit, reference) if isinstance(m, str)]
                if failed:
                    errors.append(f"{dimension}: {failed[0]}")
                    continue
                p_self = sigmoid(reference) if reference is not None else None  # type: ignore[arg-type]
                dimensions[dimension] = to_score(sigmoid(edit), p_self, self.spec.mapping)  # type: ignore[arg-type]
            if errors:
                results.append(BackendResult(item_id=item.item_id, error="; ".join(errors)))
            else:
                results.append(BackendResult(item_id=item.item_id, dimensions=dimensions))
        while len(self._self_margins) > _SELF_CACHE_SIZE:
            self._self_margins.popitem(last=False)
        return results


def build_internal_vlm(spec: InternalVLMSpec) -> InternalVLMBackend:
    """The backend with the engine ``spec.engine``.

    Raises:
        ValueError: missing checkpoint directory, missing ``base_url`` for
            ``vllm_http``, vLLM not installed, or Yes/No not single tokens.
    """
    if spec.engine == "transformers":
        from editrl.reward_server.backends.vlm_engines import TransformersEngine

        engine: Any = TransformersEngine.from_pretrained(
            spec.model, device=spec.device, dtype=spec.dtype, forward_batch_size=spec.forward_batch_size,
            reasoning_tokens=spec.reasoning_tokens,
        )
    elif spec.engine == "vllm_http":
        if not spec.base_url:
            raise ValueError("engine 'vllm_http' needs base_url (the vLLM server root)")
        from editrl.reward_server.backends.vllm_http import VLLMHTTPEngine

        engine = VLLMHTTPEngine(
            spec.base_url, spec.model, api_key_env=spec.api_key_env, timeout_s=spec.timeout_s,
            max_concurrency=spec.max_concurrency, top_logprobs=spec.top_logprobs, reasoning_tokens=spec.reasoning_tokens,
        )
    else:
        from editrl.reward_server.backends.vlm_engines import VLLMEngine

        engine = VLLMEngine(spec.model, dtype=spec.dtype, top_logprobs=spec.top_logprobs,
                            reasoning_tokens=spec.reasoning_tokens, images_per_prompt=2 * spec.num_frames)
    return InternalVLMBackend(spec, engine)
