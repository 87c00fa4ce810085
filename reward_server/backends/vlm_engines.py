"""In-process engines of the internal-VLM backend: transformers (CPU or GPU) and vLLM (GPU, optional).

An engine answers :class:`~.vlm_questions.YesNoPrompt` s with the logit margin
``l_yes - l_no`` of the answer's first token (see :mod:`.vlm_questions`).

The transformers engine serves Qwen2-VL-class models (Qwen2-VL, Qwen2.5-VL):
it renders the chat template, expands each image placeholder to the number of
merged patches of its image (``prod(grid_thw) / merge_size**2``, as the
model's processor does), left-pads a batch, and reads the logits of the last
position. It composes the tokenizer and the PIL image processor itself because
the Qwen2-VL processor class also requires a video processor that needs
torchvision, which this project does not depend on. torch and transformers are
imported only when an engine is built.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from editrl.reward_server.backends.vlm_questions import NO_WORDS, YES_WORDS, YesNoPrompt, margin_from_logprobs, reasoning_prefix

logger = logging.getLogger(__name__)


def single_token_ids(tokenizer: Any, words: tuple[str, ...]) -> list[int]:
    """Ids of the spellings in ``words`` that the tokenizer encodes as one token.

    Raises:
        ValueError: none of them is a single token.
    """
    ids = []
    for word in words:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    if not ids:
        raise ValueError(f"none of {words} is a single token for this tokenizer")
    return ids


def resolve_device_dtype(device: str, dtype: str) -> tuple[Any, Any]:
    """(torch device, torch dtype): ``auto`` device is CUDA when available; ``auto`` dtype is bfloat16 on CUDA, else float32."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    if dtype == "auto":
        return torch_device, (torch.bfloat16 if torch_device.type == "cuda" else torch.float32)
    return torch_device, getattr(torch, dtype)


class TransformersEngine:
    """Yes/No margins from a transformers image-text-to-text model, in batches.

    Args:
        model: a Qwen2-VL-class ``...ForConditionalGeneration`` in eval mode.
        tokenizer: its tokenizer, with a chat template.
        image_processor: its image processor (``pixel_values``, ``image_grid_thw``).
        forward_batch_size: prompts per forward pass.
        reasoning_tokens: greedy tokens generated before the answer (0: none).

    Raises:
        ValueError: Yes or No is not a single token, or the model config has no image token.
    """

    remote = False

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any, forward_batch_size: int = 16,
                 reasoning_tokens: int = 0) -> None:
        image_token_id = getattr(model.config, "image_token_id", None)
        if image_token_id is None:
            raise ValueError(f"{type(model).__name__} has no image_token_id: not a Qwen2-VL-class model")
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.image_processor = image_processor
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        self.merge = int(getattr(image_processor, "merge_size", 2))
        self.forward_batch_size = forward_batch_size
        self.reasoning_tokens = reasoning_tokens
        self.yes_ids = single_token_ids(tokenizer, YES_WORDS)
        self.no_ids = single_token_ids(tokenizer, NO_WORDS)

    @classmethod
    def from_pretrained(cls, path: str, device: str = "auto", dtype: str = "auto", **kwargs: Any) -> "TransformersEngine":
        """Load model, tokenizer and (PIL) image processor from a local checkpoint directory.

        Raises:
            ValueError: ``path`` is not a directory (nothing is ever downloaded).
        """
        if not Path(path).is_dir():
            raise ValueError(f"model directory {path!r} does not exist (checkpoints are read from local disk only)")
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        torch_device, torch_dtype = resolve_device_dtype(device, dtype)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
        model = model.to(torch_device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        image_processor = AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True)
        logger.info("loaded %s from %s on %s (%s)", type(model).__name__, path, torch_device, torch_dtype)
        return cls(model, tokenizer, image_processor, **kwargs)

    def _encode(self, prompts: list[YesNoPrompt], prefixes: list[str]) -> dict[str, Any]:
        images = [image for prompt in prompts for image in prompt.images]
        vision = self.image_processor(images=images, return_tensors="pt")
        counts = iter((vision["image_grid_thw"].prod(-1) // self.merge**2).tolist())
        texts = []
        for prompt, prefix in zip(prompts, prefixes):
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt.content()}], add_generation_prompt=True, tokenize=False
            )
            pieces = text.split(self.image_token)
            if len(pieces) - 1 != len(prompt.images):
                raise ValueError(f"chat template gave {len(pieces) - 1} image placeholders for {len(prompt.images)} images")
            expanded = pieces[0] + "".join(self.image_token * next(counts) + piece for piece in pieces[1:])
            texts.append(expanded + prefix)
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        inputs = {key: value.to(device) for key, value in encoded.items()}
        inputs["pixel_values"] = vision["pixel_values"].to(device=device, dtype=dtype)
        inputs["image_grid_thw"] = vision["image_grid_thw"].to(device)
        return inputs

    def _reason(self, prompts: list[YesNoPrompt]) -> list[str]:
        inputs = self._encode(prompts, [""] * len(prompts))
        generated = self.model.generate(
            **inputs, max_new_tokens=self.reasoning_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id
        )
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        return [reasoning_prefix(text) for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def margins(self, prompts: list[YesNoPrompt]) -> list[float]:
        """``l_yes - l_no`` per prompt (batched ``forward_batch_size`` at a time)."""
        import torch

        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(prompts), self.forward_batch_size):
                chunk = prompts[start:start + self.forward_batch_size]
                prefixes = self._reason(chunk) if self.reasoning_tokens else [""] * len(chunk)
                logits = self.model(**self._encode(chunk, prefixes)).logits[:, -1, :].float()
                margin = torch.logsumexp(logits[:, self.yes_ids], dim=-1) - torch.logsumexp(logits[:, self.no_ids], dim=-1)
                out.extend(margin.tolist())
        return out

    def close(self) -> None:
        self.model = None


class VLLMEngine:
    """Yes/No margins from vLLM in process (GPU), read from the first token's top log-probabilities.

    Args:
        model: local checkpoint directory.
        dtype: weights dtype (``auto``, ``bfloat16``, ...).
        top_logprobs: alternatives returned per token.
        reasoning_tokens: greedy tokens generated before the answer (0: none).
        images_per_prompt: most images in one prompt.

    Raises:
        ValueError: vLLM is not installed (the optional ``vllm`` extra, GPU only).
    """

    remote = False

    def __init__(self, model: str, dtype: str = "auto", top_logprobs: int = 20, reasoning_tokens: int = 0,
                 images_per_prompt: int = 8) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise ValueError("engine 'vllm' needs vLLM (GPU only): install the optional extra editrl[vllm]") from exc
        self._sampling = SamplingParams
        self._llm = LLM(model=model, dtype=dtype, limit_mm_per_prompt={"image": images_per_prompt})
        self.top_logprobs = top_logprobs
        self.reasoning_tokens = reasoning_tokens

    def margins(self, prompts: list[YesNoPrompt]) -> list[float]:
        from editrl.reward_server.backends.vllm_http import openai_messages

        messages = [openai_messages(prompt) for prompt in prompts]
        extra: dict[str, Any] = {}
        if self.reasoning_tokens:
            first = self._llm.chat(messages, self._sampling(max_tokens=self.reasoning_tokens, temperature=0.0))
            messages = [m + [{"role": "assistant", "content": reasoning_prefix(o.outputs[0].text)}]
                        for m, o in zip(messages, first)]
            extra = {"add_generation_prompt": False, "continue_final_message": True}
        outputs = self._llm.chat(messages, self._sampling(max_tokens=1, temperature=0.0, logprobs=self.top_logprobs), **extra)
        margins = []
        for output in outputs:
            alternatives = output.outputs[0].logprobs[0]
            margins.append(margin_from_logprobs([(lp.decoded_token or "", lp.logprob) for lp in alternatives.values()]))
        return margins
