"""The sharded load of a checkpoint's DiT: every rank reads only its slice of each weight.

A learner that shards the DiT with FSDP2 (``topology.learner.sharding: fsdp``) would otherwise load
the whole model on every rank and then keep 1/N of it, so its load peak is the whole model
(Wan2.1-14B: 28 GiB in bf16 per rank, 57 GiB of fp32 file pages read). Instead:

1. :func:`placeholder_transformer` builds the transformer from its ``config.json`` with
   every parameter a zero-byte placeholder (a stride-0 view of one zero of the parameter's
   dtype, so its shape, dtype, device and module tree are the real ones), buffers computed
   as the class computes them; the LoRA adapter is then attached for real (peft puts it on
   its base layer's device, which a meta parameter would make meta);
2. :func:`defer_weights` turns the placeholders into meta parameters, which FSDP2's
   ``fully_shard`` shards without allocating them (the adapter is sharded as usual);
3. :func:`load_weight_slices` allocates each rank's slices (1/N of the weights) and reads
   each parameter's rows from the safetensors files (memory-mapped: only those rows' pages
   are touched), cast into the slice.

The files are the diffusers layout: ``diffusion_pytorch_model.safetensors`` or shards
listed by ``diffusion_pytorch_model.safetensors.index.json``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel
from accelerate import init_empty_weights
from safetensors import safe_open
from torch.distributed.tensor import DTensor

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"


@dataclass(frozen=True)
class WeightFiles:
    """Where each state-dict key of a saved model lives: ``{key: safetensors file}``."""

    files: dict[str, Path]

    @classmethod
    def of(cls, directory: str | Path) -> "WeightFiles":
        """The keys of a diffusers model folder (one file, or the shards of its index).

        Raises:
            FileNotFoundError: neither the file nor the index is there, or a shard the index names is missing.
        """
        directory = Path(directory)
        index = directory / INDEX_NAME
        if index.is_file():
            names = json.loads(index.read_text())["weight_map"]
            files = {key: directory / name for key, name in names.items()}
        elif (directory / WEIGHTS_NAME).is_file():
            with safe_open(directory / WEIGHTS_NAME, framework="pt") as handle:
                files = {key: directory / WEIGHTS_NAME for key in handle.keys()}
        else:
            raise FileNotFoundError(f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}")
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise FileNotFoundError(f"{index} names {path.name}, which is missing")
        return cls(files)


def load_dtype(module: torch.nn.Module, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype ``from_pretrained(torch_dtype=dtype)`` gives the tensor ``name`` of ``module``:
    ``dtype`` for floating-point tensors, except fp32 in the modules the class keeps in fp32.
    diffusers keeps ``_keep_in_fp32_modules`` (Wan's norms, time embedding,
    ``scale_shift_table``) under any 16-bit dtype; transformers keeps them only under fp16 and
    ``_keep_in_fp32_modules_strict`` under fp16 and bf16 (UMT5's ``wo`` is bf16 under bf16)."""
    if not tensor.is_floating_point() or dtype == torch.float32:
        return tensor.dtype if not tensor.is_floating_point() else dtype
    keep = set(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
    if not isinstance(module, PreTrainedModel) or dtype == torch.float16:
        keep |= set(getattr(module, "_keep_in_fp32_modules", None) or [])
    return torch.float32 if keep & set(name.split(".")) else dtype


def placeholder(param: torch.Tensor) -> torch.nn.Parameter:
    """A frozen parameter of ``param``'s shape and dtype that holds no memory: a stride-0 view of one zero."""
    return torch.nn.Parameter(torch.zeros((), dtype=param.dtype).expand(param.shape), requires_grad=False)


def placeholder_transformer(directory: str | Path, model_cls: type, dtype: torch.dtype) -> torch.nn.Module:
    """The transformer of ``directory/config.json`` with placeholder parameters in their load dtype.

    Each parameter gets its :func:`load_dtype`; buffers are real (the rotary tables are computed, not loaded).

    Raises:
        FileNotFoundError: no ``config.json``.
    """
    directory = Path(directory)
    config = model_cls.load_config(directory, local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = model_cls.from_config(config)
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is not None:
                target = load_dtype(model, f"{module_name}.{name}", param, dtype)
                module._parameters[name] = placeholder(param.to(target))
    return model


def defer_weights(model: torch.nn.Module, weights: WeightFiles) -> int:
    """Replace every parameter of ``model`` that ``weights`` holds by a meta parameter of its
    shape and dtype (frozen), to be sharded and then read by :func:`load_weight_slices`.

    Returns:
        The number of parameters deferred.
    """
    count = 0
    for prefix, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is not None and file_key(f"{prefix}.{name}" if prefix else name) in weights.files:
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
                count += 1
    return count


def file_key(name: str) -> str:
    """The checkpoint's key of a parameter of the model with the adapter attached (peft moves
    an adapted layer's own weights under ``base_layer``)."""
    return name.replace(".base_layer.", ".")


def _rows(local: torch.Tensor, full_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of the full parameter that FSDP2 put in this rank's slice
    (``torch.chunk`` over dim 0: chunks of ``ceil(rows / world_size)``, the last ones short or empty).

    Raises:
        RuntimeError: the local slice does not have that many rows (another sharding rule).
    """
    chunk = -(-full_rows // world_size)
    start = min(rank * chunk, full_rows)
    stop = min(start + chunk, full_rows)
    if local.shape[0] != stop - start:
        raise RuntimeError(f"a slice of {local.shape[0]} rows, expected rows {start}:{stop} of {full_rows} on rank {rank}")
    return start, stop


@torch.no_grad()
def load_weight_slices(model: torch.nn.Module, weights: WeightFiles, rank: int, world_size: int,
                       device: torch.device) -> int:
    """Allocate the meta parameters of ``model`` (:func:`defer_weights`, then sharded by FSDP2
    over ``world_size`` ranks) on ``device`` and fill them from the files.

    Every parameter that is not a LoRA parameter must be in the files, with the saved shape
    or, for a patch embedding widened for source conditioning (``concat``), fewer input
    channels: those are copied into the leading channels and the rest are zero, as
    :func:`editrl.policy.model.widen_for_source_conditioning` does. A parameter that is not
    sharded (a plain tensor) is read whole. Buffers in the files are loaded whole.

    Returns:
        Bytes read from the files (the rows of this rank, in the stored dtype).

    Raises:
        KeyError: a parameter is not in the files, or a file key names nothing in the model.
        ValueError: a saved shape does not fit its parameter.
    """
    names = {file_key(name) for name, _ in model.named_parameters() if "lora_" not in name}
    unknown = sorted(set(weights.files) - names - {file_key(name) for name, _ in model.named_buffers()})
    missing = sorted(names - set(weights.files))
    if unknown or missing:
        raise KeyError(f"the checkpoint and the model do not match: missing {missing[:5]}, unexpected {unknown[:5]}")
    # FSDP2 re-points its shards at the new storage (FSDPModule._apply), as for module.to_empty
    model._apply(lambda t: torch.empty_like(t, device=device) if _local(t).is_meta else t)
    params = {file_key(name): param for name, param in model.named_parameters() if "lora_" not in name}
    buffers = {file_key(name): buffer for name, buffer in model.named_buffers()}
    bytes_read = 0
    for key, path in weights.files.items():
        # one opening per tensor: the rows' pages are mapped only while they are copied (a file
        # kept open would keep every page it touched resident, up to its whole size)
        with safe_open(path, framework="pt") as handle:
            stored = handle.get_slice(key)
            saved_shape = tuple(stored.get_shape())
            if key in buffers:
                buffers[key].copy_(stored[:] if saved_shape else handle.get_tensor(key))
                continue
            param = params[key]
            full_shape = tuple(param.shape)
            _check_shape(key, saved_shape, full_shape)
            if not full_shape:
                raise ValueError(f"{key}: a 0-dimensional parameter cannot be loaded by rows")
            local = _local(param)
            start, stop = _rows(local, full_shape[0], rank, world_size) if local is not param else (0, full_shape[0])
            rows = stored[start:stop]
            bytes_read += rows.numel() * rows.element_size()
            local.zero_()
            local[(slice(None), *(slice(0, n) for n in saved_shape[1:]))].copy_(rows)
            del rows, stored
    logger.info("rank %d read %.1f MiB of weight rows from %d files", rank, bytes_read / 2**20, len(set(weights.files.values())))
    return bytes_read


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local slice of a DTensor, a plain tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _check_shape(key: str, saved: tuple[int, ...], full: tuple[int, ...]) -> None:
    """A saved shape must equal the parameter's, or (the widened patch embedding) have fewer input channels."""
    widened = key.startswith("patch_embedding.weight") and len(saved) == len(full) > 1 and saved[0] == full[0] \
        and saved[1] < full[1] and saved[2:] == full[2:]
    if saved != full and not widened:
        raise ValueError(f"{key}: saved shape {list(saved)}, the model's {list(full)}")
