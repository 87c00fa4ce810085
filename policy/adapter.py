"""The LoRA adapter's weights as they travel: an index of the adapter's parameters,
the flat buffer the learner publishes (:class:`PackedAdapter`), the layout and
checksum checks a worker runs before loading, and the in-place load."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from peft import LoraConfig
from torch.distributed.tensor import DTensor, distribute_tensor
from peft.utils import get_peft_model_state_dict

from editrl.policy.config import LoraSettings

ADAPTER_NAME = "default"
"""The peft adapter name of the trained LoRA adapter."""


class AdapterMismatchError(RuntimeError):
    """Adapter weights that do not fit the policy's LoRA modules."""


def full_value(param: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value: a parameter sharded by FSDP2 (a ``DTensor``) is
    all-gathered, a collective every rank of its mesh must call at the same point."""
    return param.full_tensor() if isinstance(param, DTensor) else param


PATCH_EMBEDDING = "patch_embedding"
"""Module name of the DiT's input Conv3d (Wan), adapted when ``LoraSettings.patch_embedding`` resolves true."""


def lora_target_regex(names: list[str], attention: tuple[str, ...] = ("self", "cross"), patch_embedding: bool = False) -> str:
    """Regex that peft matches (fully) against module names: the given projections in
    every self-attention (attn1) and/or cross-attention (attn2) block, and with
    ``patch_embedding`` the DiT's top-level ``patch_embedding`` too."""
    alternatives = "|".join(n.replace(".", r"\.") for n in names)
    blocks = "".join(sorted({"self": "1", "cross": "2"}[a] for a in attention))
    attention_regex = rf".*blocks\.\d+\.attn[{blocks}]\.({alternatives})"
    return rf"(?:{attention_regex}|{PATCH_EMBEDDING})" if patch_embedding else attention_regex


def attach_lora(transformer: torch.nn.Module, lora: LoraSettings, seed: int = 0, patch_embedding: bool = False) -> int:
    """Add the trained LoRA adapter (named ``ADAPTER_NAME``) to the DiT's attention
    projections that ``lora`` names, and with ``patch_embedding`` to its input Conv3d (peft's
    Conv3d LoRA: ``A`` a Conv3d of the patch kernel to ``rank`` channels, ``B`` a 1x1x1 Conv3d,
    zero at the start); its A and B matrices are fp32 whatever the
    weights' dtype (they and their AdamW state stay full precision under bf16).
    Their initial values come from ``seed`` alone (the CPU generator is forked and
    seeded), whatever was drawn before: loading the DiT whole or as slices, or building
    it in code, gives the same adapter.

    Returns:
        The number of adapted modules.

    Raises:
        AdapterMismatchError: the targets match no module.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(
            LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                init_lora_weights=lora.init if lora.init == "gaussian" else True,
                target_modules=lora_target_regex(lora.target_modules, tuple(lora.attention), patch_embedding),
            ),
            adapter_name=ADAPTER_NAME,
        )
    for name, param in transformer.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    count = sum(1 for name, _ in transformer.named_modules() if name.endswith(".lora_A"))
    if count == 0:
        raise AdapterMismatchError(f"LoRA attached to no module (targets {lora.target_modules})")
    return count


class AdapterIndex:
    """Every key of peft's adapter state dict mapped to its LoRA parameter, once.

    The keys, shapes and module count never change after the adapter is
    attached, so publishing and loading walk this index (one entry per LoRA
    matrix) instead of the whole model's state dict: their cost depends on the
    adapter's size, not the model's. When the transformer's parameters are replaced
    (FSDP2 sharding), :meth:`rebind` points the index at the new ones; on sharded
    parameters :meth:`state` and :meth:`pack` all-gather and :meth:`load` keeps each
    rank's shard, so every rank must call them together.

    Args:
        transformer: the DiT with the adapter attached (peft).
        adapter_name: peft's name of the adapter.
        num_modules: how many modules the adapter was attached to.

    Raises:
        AdapterMismatchError: a key of peft's state dict is not a parameter of
            the transformer, or the keys do not cover ``num_modules`` modules.
    """

    def __init__(self, transformer: torch.nn.Module, adapter_name: str, num_modules: int):
        by_pointer = {p.data_ptr(): (n, p) for n, p in transformer.named_parameters() if "lora_" in n}
        state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
        keys = tuple(sorted(state))
        named = []
        for key in keys:
            entry = by_pointer.get(state[key].data_ptr())
            if entry is None:
                raise AdapterMismatchError(f"adapter key {key} is not a LoRA parameter of the transformer")
            named.append(entry)
        self.keys = keys
        self.names = tuple(name for name, _ in named)
        """The transformer's parameter name of each key."""
        self.params = tuple(param for _, param in named)
        self.shapes = tuple(tuple(p.shape) for p in self.params)
        self.offsets = tuple(np.cumsum([0] + [p.numel() for p in self.params]).tolist())
        modules = _adapter_modules(keys)
        if modules != num_modules:
            raise AdapterMismatchError(f"adapter covers {modules} modules, policy has {num_modules}")

    def rebind(self, transformer: torch.nn.Module) -> None:
        """Point the index at ``transformer``'s parameters of the same names (after FSDP2's
        ``fully_shard`` replaced them by sharded ones).

        Raises:
            AdapterMismatchError: a LoRA parameter of the index is no longer there.
        """
        by_name = dict(transformer.named_parameters())
        missing = [name for name in self.names if name not in by_name]
        if missing:
            raise AdapterMismatchError(f"LoRA parameters {missing[:3]} are no longer parameters of the transformer")
        self.params = tuple(by_name[name] for name in self.names)

    def state(self) -> dict[str, torch.Tensor]:
        """The adapter's weights in peft's key format (keys sorted), as contiguous CPU fp32 copies."""
        with torch.no_grad():
            return {k: full_value(p).detach().to("cpu", torch.float32, copy=True).contiguous()
                    for k, p in zip(self.keys, self.params)}

    def pack(self) -> "PackedAdapter":
        """The adapter's weights as one flat CPU fp32 buffer (see :class:`PackedAdapter`):
        what the learner publishes (one buffer travels through Ray's object store
        without a copy per tensor and is checksummed in one pass)."""
        with torch.no_grad():
            flat = torch.cat([full_value(p).detach().reshape(-1) for p in self.params])
        return PackedAdapter(keys=self.keys, shapes=self.shapes, values=flat.to("cpu", torch.float32).numpy())

    def load(self, state: "dict[str, torch.Tensor] | PackedAdapter", checksum: str | None = None) -> None:
        """Load adapter weights produced by :meth:`state` or :meth:`pack`, copying them
        in place into the LoRA parameters.

        Everything is verified (:meth:`check`) before a single parameter changes, so
        a rejected adapter leaves the loaded one intact.

        Args:
            state: peft-format key -> tensor (any float dtype, any shape-compatible
                layout), or a :class:`PackedAdapter`.
            checksum: :func:`adapter_checksum` of the weights as published; checked
                when given.

        Raises:
            AdapterMismatchError: see :meth:`check`.
        """
        keys = self.check(state, checksum)
        with torch.no_grad():
            if isinstance(state, PackedAdapter):
                self._copy_packed(state.values)
            else:
                for key, param in zip(keys, self.params):
                    param.copy_(_like(param, state[key]))

    def check(self, state: "dict[str, torch.Tensor] | PackedAdapter", checksum: str | None = None) -> tuple[str, ...]:
        """Verify that ``state`` fits this adapter, without loading it.

        Args:
            state: as for :meth:`load`.
            checksum: :func:`adapter_checksum` of the weights as published; checked
                when given (a CRC-32 over every value: the only check whose cost
                grows with the adapter size).

        Returns:
            The adapter's keys in load order.

        Raises:
            AdapterMismatchError: the keys do not cover exactly this adapter's LoRA
                modules, a shape differs, a packed buffer has the wrong length, or
                ``checksum`` does not match the weights.
        """
        if isinstance(state, PackedAdapter):
            keys, shapes = tuple(state.keys), tuple(tuple(s) for s in state.shapes)
        else:
            keys = tuple(sorted(state))
            shapes = tuple(tuple(state[k].shape) for k in keys)
        if keys != self.keys:
            expected = set(self.keys)
            missing, extra = sorted(expected - set(keys))[:3], sorted(set(keys) - expected)[:3]
            raise AdapterMismatchError(f"adapter keys differ: missing {missing}, unexpected {extra}")
        if shapes != self.shapes:
            bad = [(k, got, want) for k, got, want in zip(keys, shapes, self.shapes) if got != want]
            raise AdapterMismatchError(f"adapter shapes differ: {bad[:3]} (key, got, expected)")
        # Equal keys mean the adapter covers exactly the modules that the index
        # counted, so the module count needs no separate check here.
        if isinstance(state, PackedAdapter) and state.values.shape != (self.offsets[-1],):
            raise AdapterMismatchError(f"packed adapter holds {state.values.shape} values, expected ({self.offsets[-1]},)")
        if checksum is not None and adapter_checksum(state) != checksum:
            raise AdapterMismatchError("adapter checksum mismatch")
        return keys

    def _copy_packed(self, values: np.ndarray) -> None:
        """Copy a flat fp32 buffer (possibly a read-only view of Ray's object store)
        into the LoRA parameters, slice by slice in key order."""
        offsets, params = self.offsets, self.params
        if all(p.device.type == "cpu" and p.dtype == torch.float32 and not isinstance(p, DTensor) for p in params):
            for i, param in enumerate(params):  # numpy views of the parameters: no temporary tensors
                param.detach().numpy().reshape(-1)[:] = values[offsets[i] : offsets[i + 1]]
            return
        flat = torch.from_numpy(np.array(values, dtype=np.float32, copy=True)).to(params[0].device)
        for i, param in enumerate(params):
            param.copy_(_like(param, flat[offsets[i] : offsets[i + 1]].view(param.shape)))


def _like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``param``: this rank's shard of it for a sharded
    parameter (no communication: every rank holds the whole value), else unchanged."""
    if not isinstance(param, DTensor):
        return value
    return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None)


@dataclass(frozen=True)
class PackedAdapter:
    """An adapter's weights in one flat buffer, as the learner publishes them.

    Attributes:
        keys: peft-format keys, sorted (``...attn1.to_q.lora_A.weight``).
        shapes: each key's tensor shape, in the same order.
        values: ``float32`` ``(N,)``, the tensors' values (C order) one after the
            other in key order; ``N`` is the sum of the shapes' sizes.
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    values: np.ndarray


def _adapter_modules(keys) -> int:
    """How many modules the keys' LoRA matrices belong to."""
    return len({k.rsplit(".lora_", 1)[0] for k in keys})


def adapter_checksum(state: "dict[str, torch.Tensor] | PackedAdapter") -> str:
    """CRC-32 over the adapter's layout (sorted keys and shapes) and then its raw fp32
    bytes in that key order, as ``"crc32:<8 hex digits>"``.

    A dict and the :class:`PackedAdapter` of the same weights give the same value.
    It detects corrupted or mismatched transfers (any change of up to 32 bits,
    others with probability 1 - 2^-32), not deliberate tampering; it is one
    pass over the bytes at memory speed, which keeps publishing cheap.
    """
    if isinstance(state, PackedAdapter):
        keys, shapes = tuple(state.keys), tuple(tuple(s) for s in state.shapes)
        chunks = [np.ascontiguousarray(state.values, dtype=np.float32)]
    else:
        keys = tuple(sorted(state))
        shapes = tuple(tuple(state[k].shape) for k in keys)
        chunks = [state[k].detach().to("cpu", torch.float32).contiguous().numpy() for k in keys]
    header = "\n".join(f"{k}:{','.join(map(str, shape))}" for k, shape in zip(keys, shapes))
    crc = zlib.crc32(header.encode())
    for chunk in chunks:
        crc = zlib.crc32(memoryview(chunk).cast("B"), crc)
    return f"crc32:{crc:08x}"
