"""Reading a precomputed cache of source latents and instruction embeddings.

``editrl data cache`` (:mod:`editrl.cluster.encode_cache`) writes a directory of
``shard-XXXXX.safetensors`` files and a ``manifest.json``; a rollout worker given that
directory (``data.encode_cache``) reads a clip's VAE latents and an instruction's text
embeddings from it instead of running the VAE encoder and the text encoder. Tensors in a shard:

* ``source/<source key>``: ``float32 (1, C, f, h, w)`` normalised VAE latents (posterior mode),
  as :meth:`editrl.policy.policy.EditPolicy.encode_video` returns them;
* ``payload/<source key>``: ``uint8 (N,)``, the bytes of the clip's mp4 at the config's fps
  (:func:`editrl.protocol.video.encode_mp4`), as a worker sends the source to the reward server;
* ``text/<text key>``: ``(1, L, D)`` embeddings in the policy's dtype (float32 when that dtype
  would round them), as :meth:`~editrl.policy.policy.EditPolicy.encode_text` returns them.

The manifest's ``fingerprint`` (:func:`policy_fingerprint`) names everything that changes these
tensors; a worker whose own fingerprint differs refuses the cache. Keys: :func:`source_key`,
:func:`text_key`.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from editrl.policy.config import PolicyConfig

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
"""The manifest's file name inside a cache directory (written last)."""
FORMAT = 1
"""Version of the cache layout written in the manifest."""
ENCODER_FOLDERS = ("vae", "text_encoder", "tokenizer")
"""The checkpoint folders whose ``.json`` files are hashed into the fingerprint."""


def source_key(video_path: str, start_s: float | None, end_s: float | None) -> str:
    """SHA-1 (hex) of ``"video_path\\nstart_s\\nend_s"``, times as ``repr(float)`` or empty for None;
    ``video_path`` as the prompt table resolves it (absolute)."""
    times = ["" if t is None else repr(float(t)) for t in (start_s, end_s)]
    return hashlib.sha1("\n".join([str(video_path), *times]).encode()).hexdigest()


def text_key(instruction: str) -> str:
    """SHA-1 (hex) of the instruction (UTF-8)."""
    return hashlib.sha1(instruction.encode()).hexdigest()


def checkpoint_path(config: PolicyConfig, root: str | Path) -> Path | None:
    """The checkpoint directory the policy loads (relative to ``root``, resolved), or None (built in code)."""
    if config.checkpoint is None:
        return None
    path = Path(config.checkpoint)
    return (path if path.is_absolute() else Path(root) / path).resolve()


def _configs_sha1(path: Path) -> str:
    """SHA-1 over the relative names and bytes of the ``.json`` files of :data:`ENCODER_FOLDERS`."""
    digest = hashlib.sha1()
    for file in sorted(p for folder in ENCODER_FOLDERS for p in (path / folder).glob("*.json")):
        digest.update(str(file.relative_to(path)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def policy_fingerprint(config: PolicyConfig, fps: float, seed: int, root: str | Path,
                       vocabulary: dict[str, int] | None) -> dict:
    """What the cached tensors depend on, as a JSON-able dict.

    Args:
        config: the policy (``kind``, ``dtype``, geometry, ``max_text_tokens``, the checkpoint or
            ``tiny`` sizes are read).
        fps: the rate clips are sampled at (the run's top-level ``fps``).
        seed: the seed of a model built in code (its random VAE and text-encoder weights).
        root: the directory a relative checkpoint path resolves against.
        vocabulary: the tokenizer's vocabulary of a model built in code (made from the run's
            instructions); ignored for a checkpoint.

    Returns:
        ``checkpoint`` (resolved path or None), ``checkpoint_configs`` (SHA-1 of the json files of
        its ``vae/``, ``text_encoder/`` and ``tokenizer/``), ``kind``, ``dtype``, ``height``,
        ``width``, ``num_frames``, ``fps``, ``max_text_tokens``, and for a model built in code
        ``tiny`` (its :class:`~editrl.policy.config.TinyModelConfig`), ``seed`` and ``vocabulary``
        (SHA-1 of the sorted vocabulary); those three are None for a checkpoint.
    """
    path = checkpoint_path(config, root)
    tiny = path is None
    return {
        "checkpoint": None if tiny else str(path),
        "checkpoint_configs": None if tiny else _configs_sha1(path),
        "kind": config.kind, "dtype": config.dtype,
        "height": config.height, "width": config.width, "num_frames": config.num_frames, "fps": fps,
        "max_text_tokens": config.max_text_tokens,
        "tiny": config.tiny.model_dump(mode="json") if tiny else None,
        "seed": seed if tiny else None,
        "vocabulary": hashlib.sha1(json.dumps(sorted((vocabulary or {}).items())).encode()).hexdigest() if tiny else None,
    }


def fingerprint_differences(cached: dict, own: dict) -> list[str]:
    """``field: <cached> in the cache, <own> here`` for every field that differs (sorted by field)."""
    return [f"{field}: {cached.get(field)!r} in the cache, {own.get(field)!r} here"
            for field in sorted(set(cached) | set(own)) if cached.get(field) != own.get(field)]


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a cache directory.

    Raises:
        FileNotFoundError: no ``manifest.json`` (not a cache, or its build did not finish).
        ValueError: not valid JSON, or another :data:`FORMAT`.
    """
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"encode cache {directory}: no {MANIFEST} (build it with editrl data cache; "
                                "the manifest is written last, so a build that did not finish has none)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"encode cache {path}: not valid JSON ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"encode cache {path}: format {manifest.get('format')!r}, this editrl reads {FORMAT}")
    return manifest


class EncodeCache:
    """Lookups in a cache directory for one policy; counts hits and misses.

    Args:
        directory: the cache (``editrl data cache --out``).
        fingerprint: :func:`policy_fingerprint` of the reading worker's policy.

    Raises:
        FileNotFoundError, ValueError: see :func:`read_manifest`.
        ValueError: the cache's fingerprint differs from ``fingerprint``; the message names
            every differing field with both values.
    """

    def __init__(self, directory: str | Path, fingerprint: dict):
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        differences = fingerprint_differences(manifest.get("fingerprint", {}), fingerprint)
        if differences:
            raise ValueError(f"encode cache {self.directory} was built for another policy ({'; '.join(differences)}); "
                             "rebuild it with editrl data cache for this config, or unset data.encode_cache")
        self._sources: dict[str, dict] = manifest.get("sources", {})
        self._texts: dict[str, dict] = manifest.get("texts", {})
        self.hits = 0
        self.misses = 0
        self._warned: set[str] = set()
        logger.info("encode cache %s: %d sources, %d instructions", self.directory, len(self._sources), len(self._texts))

    def source(self, video_path: str, start_s: float | None, end_s: float | None) -> tuple[torch.Tensor, bytes] | None:
        """The clip's latents ``float32 (1, C, f, h, w)`` (CPU) and its mp4 bytes, or None (a miss:
        not in the cache, or its shard unreadable; one warning per key)."""
        key = source_key(video_path, start_s, end_s)
        found = self._read(self._sources, key, ("source", "payload"), f"clip {video_path} [{start_s}, {end_s})")
        if found is None:
            return None
        latents, payload = found
        return latents, payload.numpy().tobytes()

    def text(self, instruction: str) -> torch.Tensor | None:
        """The instruction's embeddings ``float32 (1, L, D)`` (CPU), or None (a miss, one warning per key)."""
        found = self._read(self._texts, text_key(instruction), ("text",), f"instruction {instruction!r}")
        return None if found is None else found[0].float()

    def stats(self) -> dict[str, int]:
        """``{"hits": ..., "misses": ...}``: lookups answered from the cache and not."""
        return {"hits": self.hits, "misses": self.misses}

    def _read(self, entries: dict[str, dict], key: str, kinds: tuple[str, ...], what: str) -> list[torch.Tensor] | None:
        from safetensors import SafetensorError, safe_open

        entry = entries.get(key)
        problem = "not in the cache"
        if entry is not None:
            try:
                with safe_open(str(self.directory / entry["shard"]), framework="pt") as shard:
                    tensors = [shard.get_tensor(f"{kind}/{key}") for kind in kinds]
                self.hits += 1
                return tensors
            except (OSError, SafetensorError, KeyError) as exc:
                problem = f"unreadable in {entry['shard']} ({type(exc).__name__}: {exc})"
        self.misses += 1
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("encode cache %s: %s %s; encoding it here", self.directory, what, problem)
        return None
