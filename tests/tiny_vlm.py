"""A tiny random Qwen2.5-VL with an offline-trained tokenizer, saved as a local checkpoint directory.

Everything is built in code (no download): a byte-level BPE tokenizer trained
with ``tokenizers`` on a small corpus (so that ``Yes`` and ``No`` are single
tokens), Qwen's special tokens and a Qwen-style chat template, the PIL
Qwen2-VL image processor with small pixel limits, and a 2-layer model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Yes", "No", "Answer:", "Source video frames:", "Edited video frames:",
    "Does the edited video accurately carry out the instruction on the source video?",
    "Apart from what the instruction asks to change, does the edited video keep the source video unchanged",
    "Does the edit look natural and coherent in the edited video, blending in seamlessly and consistently over time?",
    "Does the edited video look realistic, free of artifacts, distortions and flicker?",
    "Answer with Yes or No. Think about it briefly, then give your final answer",
    "make it brighter darker warm cool add remove a red hat",
]


def build_tiny_qwen_vl(directory: Path, seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-VL checkpoint (model, tokenizer, image processor) into ``directory``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 5, trainer)
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    ids = {token: hf_tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    image_processor = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                               temporal_patch_size=2)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(hf_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0], window_size=28),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger output weights than the default init, so that answers differ visibly between inputs
        model.lm_head.weight.normal_(0.0, 1.0)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    hf_tokenizer.save_pretrained(directory)
    image_processor.save_pretrained(directory)
    return directory
