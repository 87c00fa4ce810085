"""Pixel-metric reward backend (``pixel``, version ``pixel-v3``): numpy and scipy, CPU only.

Every number is computed from the pixels of the source and edited videos; nothing
is random and no dimension is ever a placeholder constant. Frames are ``uint8``
``(F, H, W, 3)`` RGB and are converted to float in ``[0, 1]``. Two per-pixel
quantities are used throughout:

* luma ``Y = 0.299 R + 0.587 G + 0.114 B``;
* chroma ``C = max(R, G, B) - min(R, G, B)``.

Dimensions, each on a 0-10 scale (``None`` means "does not apply to this item"):

``instruction_following``
    See :func:`instruction_following`: the instruction is mapped to one
    checkable global edit type (:func:`detect_edit_type`), a signed measurement
    ``m`` of that change is taken and compared with a target ``t``.
``preservation``
    See :func:`preservation`: Pearson correlation of per-frame standardised luma.
``temporal_consistency``
    See :func:`temporal_consistency`: correlation of frame-to-frame luma changes
    times a flicker penalty.
``detail_preservation``
    See :func:`detail_preservation`: SSIM of per-frame standardised luma, which a
    blurred copy of the source loses and a global colour edit keeps.
"""
from __future__ import annotations

import logging
import math
import re
import time

import numpy as np

from editrl.reward_server.backends.base import BackendResult, ScoreInput

logger = logging.getLogger(__name__)

BACKEND_NAME = "pixel"
BACKEND_VERSION = "pixel-v3"
DIMENSIONS: tuple[str, ...] = ("instruction_following", "preservation", "temporal_consistency", "detail_preservation")

# Below this standard deviation (in [0, 1] units) a signal counts as constant.
_FLAT_STD = 1e-6
# Below this mean source chroma the chroma-ratio edit types are not applicable.
_MIN_SOURCE_CHROMA = 0.02
# Flicker scale of temporal_consistency: std of the per-frame luma offset (in [0, 1]).
_FLICKER_SCALE = 0.05
# detail_preservation: SSIM's Gaussian window (sigma 1.5 px, 11 x 11) and constants for signals in
# units of the frame's luma standard deviation (Wang et al. 2004: C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = 1).
_SSIM_SIGMA, _SSIM_TRUNCATE = 1.5, 3.5
_SSIM_C1, _SSIM_C2 = 1e-4, 9e-4

# Edit type -> target value of its measurement; one entry per checkable edit type of the
# dataset (editrl.protocol.edits.CHECKABLE_EDIT_TYPES, tested equal).
EDIT_TARGETS: dict[str, float] = {
    "brighten": 0.15,
    "darken": -0.15,
    "grayscale": 0.8,
    "saturate": 0.5,
    "warm": 0.15,
    "cool": 0.15,
}

_EDIT_PATTERNS: dict[str, tuple[str, ...]] = {
    "brighten": (
        r"\bbright(?:en|ens|ened|er|ness)?\b", r"\blighten\b", r"\bsunn(?:y|ier)\b",
        r"\bmore light\b", r"\bincrease (?:the )?exposure\b",
    ),
    "darken": (
        r"\bdark(?:en|ens|ened|er|ness)?\b", r"\bnight(?:time)?\b", r"\bdim(?:mer)?\b",
        r"\bdusk\b", r"\bgloom(?:y|ier)?\b",
    ),
    "grayscale": (
        r"\bblack[- ]and[- ]white\b", r"\bmonochrome\b", r"\bdesaturat(?:e|ed|ion)\b",
        r"\bgr[ae]y ?scale\b", r"\bb&w\b",
    ),
    "saturate": (
        r"\bvivid\b", r"\bcolou?rful\b", r"\bincrease (?:the )?saturation\b",
        r"\bboost (?:the )?colou?rs\b", r"(?<!de)\bsaturate\b",
    ),
    "warm": (
        r"\bwarm(?:er|th)?\b", r"\bgolden\b", r"\borange tint\b", r"\bsunset (?:tones?|colou?rs|hues?)\b",
    ),
    "cool": (
        r"\bcool(?:er)?\b", r"\bblue tint\b", r"\bbluish\b", r"\bcold(?:er)?\b", r"\bicy\b",
    ),
}
_COMPILED = {kind: [re.compile(p, re.IGNORECASE) for p in pats] for kind, pats in _EDIT_PATTERNS.items()}
# A negation or a "reduce" word shortly before a keyword reverses or muddles its meaning.
_NEGATION = re.compile(
    r"\b(?:not|don'?t|do not|no|never|without|avoid|less|reduce|lower|decrease|remove)\b"
    r"(?:\W+\w+){0,3}\W*$",
    re.IGNORECASE,
)


PixelInput = ScoreInput
"""Kept name: the pixel backend's item type is the shared :class:`ScoreInput`."""
PixelResult = BackendResult
"""Kept name: the pixel backend's result type is the shared :class:`BackendResult`."""


def detect_edit_type(instruction: str) -> str | None:
    """Map an instruction to one checkable edit type, or None.

    Types: ``brighten`` (brighter, lighten, sunnier, ...), ``darken`` (darker,
    night, dim, dusk, gloomy, ...), ``grayscale`` (black and white, monochrome,
    desaturate, grayscale/greyscale, ...), ``saturate`` (more vivid, more
    colourful, increase saturation, boost the colours, ...), ``warm`` (warm,
    golden, orange tint, sunset tones) and ``cool`` (cool, blue tint, cold, icy).
    Matching is case-insensitive on word boundaries.

    Returns None when no type matches, when more than one distinct type matches
    (conflicting or mixed signals, e.g. "brighter but darker shadows"), or when a
    matched keyword is preceded within three words by a negation or a "reduce"
    word ("don't darken", "reduce the brightness"): the rule then cannot tell what
    the edit should measure, so the dimension does not apply.
    """
    found: set[str] = set()
    for kind, patterns in _COMPILED.items():
        for pattern in patterns:
            for match in pattern.finditer(instruction):
                if _NEGATION.search(instruction[: match.start()]):
                    logger.debug("negated edit keyword %r in %r", match.group(0), instruction)
                    return None
                found.add(kind)
    if len(found) != 1:
        return None
    return found.pop()


def _to_float(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float32) / np.float32(255.0)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _chroma(rgb: np.ndarray) -> np.ndarray:
    return rgb.max(axis=-1) - rgb.min(axis=-1)


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x, dtype=np.float64))


def overshoot_score(u: float) -> float:
    """Score of the achieved fraction ``u = m / t`` of the target change, 0-10.

    Below the target the credit is logistic, ``10 * sigmoid(4 (u - 1/2)) / sigmoid(2)``:
    10 at ``u = 1``, 5.68 at ``u = 1/2``, ``10 e^-2 = 1.35`` for an unchanged video and
    close to 0 (but still increasing) for a change in the wrong direction, so that
    edits falling short are ranked rather than all scored 0. Full credit on the
    plateau ``1 <= u <= 1.5``; above it the score falls by 1 point per 0.1 of
    overshoot, ``10 * max(0, 1 - (u - 1.5))``, and is 0 from ``u = 2.5`` on.
    """
    if u <= 1.0:
        return 10.0 * _sigmoid(4.0 * (u - 0.5)) / _sigmoid(2.0)
    if u <= 1.5:
        return 10.0
    return 10.0 * max(0.0, 1.0 - (u - 1.5))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def edit_measurement(edit_type: str, source: np.ndarray, edited: np.ndarray) -> float | None:
    """Signed measurement ``m`` of ``edit_type`` (float RGB in [0, 1], same shapes).

    Means are over all pixels of all frames; ``Δ`` is edited minus source.

    * brighten, darken: ``m = Δ mean(Y)``;
    * grayscale: ``m = 1 - mean(C_e) / mean(C_s)``;
    * saturate: ``m = mean(C_e) / mean(C_s) - 1``;
    * warm: ``m = Δ mean(R - B)``; cool: ``m = -Δ mean(R - B)``.

    Returns None for the chroma-ratio types when ``mean(C_s) < 0.02`` (the source
    is already nearly gray, so the ratio is meaningless).
    """
    if edit_type in ("brighten", "darken"):
        return _mean(_luma(edited)) - _mean(_luma(source))
    if edit_type in ("grayscale", "saturate"):
        chroma_s = _mean(_chroma(source))
        if chroma_s < _MIN_SOURCE_CHROMA:
            return None
        ratio = _mean(_chroma(edited)) / chroma_s
        return 1.0 - ratio if edit_type == "grayscale" else ratio - 1.0
    if edit_type in ("warm", "cool"):
        delta = _mean(edited[..., 0] - edited[..., 2]) - _mean(source[..., 0] - source[..., 2])
        return delta if edit_type == "warm" else -delta
    raise ValueError(f"unknown edit type {edit_type!r}")


def instruction_following(instruction: str, source: np.ndarray, edited: np.ndarray) -> float | None:
    """0-10 score of how well a global, checkable edit was carried out.

    Rule: ``k = detect_edit_type(instruction)``; None if no single type is
    recognised. Otherwise ``m = edit_measurement(k, ...)`` and the target
    ``t = EDIT_TARGETS[k]`` (brighten +0.15, darken -0.15, grayscale 0.8,
    saturate 0.5, warm 0.15, cool 0.15) give ``u = m / t`` and the score
    :func:`overshoot_score` ``(u)``: partial credit below the target, full credit
    up to 1.5 times the target, a penalty for overshooting beyond that, 0 for a
    change in the wrong direction. None when the measurement does not apply.
    Inputs are float RGB in [0, 1] of equal shapes.
    """
    edit_type = detect_edit_type(instruction)
    if edit_type is None:
        return None
    measurement = edit_measurement(edit_type, source, edited)
    if measurement is None:
        return None
    return overshoot_score(measurement / EDIT_TARGETS[edit_type])


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation over all elements, in [-1, 1] (rounding clipped); None if
    either side is constant."""
    a = np.array(a, dtype=np.float64).ravel()  # always a copy: centred in place below
    b = np.array(b, dtype=np.float64).ravel()
    a -= a.mean()
    b -= b.mean()
    norm_a = float(np.sqrt(np.dot(a, a) / a.size))
    norm_b = float(np.sqrt(np.dot(b, b) / b.size))
    if norm_a < _FLAT_STD or norm_b < _FLAT_STD:
        return None
    return float(np.clip(np.dot(a, b) / a.size / (norm_a * norm_b), -1.0, 1.0))


def _standardised(y: np.ndarray) -> np.ndarray:
    """Each frame of luma ``(F, H, W)`` as ``(Y - mean(Y)) / (std(Y) + 1e-6)`` (per frame, float64)."""
    mean = y.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    std = y.std(axis=(1, 2), keepdims=True, dtype=np.float64)
    z = y - mean
    z /= std + 1e-6
    return z


def detail_preservation(source: np.ndarray, edited: np.ndarray) -> float | None:
    """0-10 score of how much of the source's fine detail the edit kept.

    The structural similarity index (SSIM, Wang, Bovik, Sheikh and Simoncelli 2004, eq. 13)
    of per-frame standardised luma ``x = z(Y_s)``, ``y = z(Y_e)`` (:func:`preservation`'s
    standardisation): with local means ``mu``, variances ``sigma^2`` and covariance
    ``sigma_xy`` under an 11 x 11 Gaussian window of sigma 1.5 pixels,
    ``SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))``
    with ``C1 = 1e-4``, ``C2 = 9e-4`` (the paper's constants for a dynamic range of one
    standard deviation), averaged over all pixels of all frames; the score is
    ``10 * max(0, mean SSIM)``. Standardising first makes a global brightness, contrast or
    tint change cost nothing (up to clipping), while blur lowers the local contrast and
    correlation terms: on the bundled clips at 64 x 64, a 4 x 4 block-average blur scores
    3.5-4.6 and the exact colour edits 8.6-10.

    None when the source has no luma structure (every frame flat). A structured source
    with a flat edited video scores 0.
    """
    from scipy.ndimage import gaussian_filter

    y_s = _luma(source)
    if float(y_s.std(axis=(1, 2), dtype=np.float64).max()) < _FLAT_STD:
        return None
    y_e = _luma(edited)
    if float(y_e.std(axis=(1, 2), dtype=np.float64).max()) < _FLAT_STD:
        return 0.0  # no detail left at all (SSIM's constants alone would give a small positive value)
    x, y = _standardised(y_s), _standardised(y_e)

    def local_mean(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma=(0.0, _SSIM_SIGMA, _SSIM_SIGMA), truncate=_SSIM_TRUNCATE, mode="reflect")

    mu_x, mu_y = local_mean(x), local_mean(y)
    var_x, var_y = local_mean(x * x) - mu_x**2, local_mean(y * y) - mu_y**2
    cov = local_mean(x * y) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + _SSIM_C1) * (2 * cov + _SSIM_C2)) / ((mu_x**2 + mu_y**2 + _SSIM_C1) * (var_x + var_y + _SSIM_C2))
    return 10.0 * max(0.0, float(ssim.mean(dtype=np.float64)))


def preservation(source: np.ndarray, edited: np.ndarray) -> float | None:
    """0-10 score of how much of the source's structure the edit kept.

    Each frame's luma is standardised, ``z = (Y - mean(Y)) / (std(Y) + 1e-6)``
    (per frame), and the score is ``10 * max(0, corr(z_s, z_e))`` with the Pearson
    correlation over all pixels of all frames. Standardising per frame makes the
    score invariant to global brightness, contrast and tint changes.

    None when the source has no luma structure at all (every frame flat): there
    is nothing to preserve. A structured source with a flat edited video scores 0.
    """
    y_s, y_e = _luma(source), _luma(edited)
    if float(y_s.std(axis=(1, 2), dtype=np.float64).max()) < _FLAT_STD:
        return None
    corr = _pearson(_standardised(y_s), _standardised(y_e))
    return 0.0 if corr is None else 10.0 * max(0.0, corr)


def temporal_consistency(source: np.ndarray, edited: np.ndarray) -> float | None:
    """0-10 score: the edit moves like the source and does not flicker.

    With ``d_s = Y_s[t+1] - Y_s[t]`` and ``d_e`` likewise (luma frame
    differences), ``motion = max(0, corr(d_s, d_e))`` (Pearson over all pixels of
    all differences) and ``flicker = std_t(mean Y_e[t] - mean Y_s[t])`` (population
    std over frames of the per-frame mean luma offset), the score is
    ``10 * motion * exp(-flicker / 0.05)``.

    If both ``d_s`` and ``d_e`` are constant (no motion on either side) the motion
    term is 1; if exactly one is constant it is 0. None for a single-frame video.
    """
    if source.shape[0] < 2:
        return None
    y_s, y_e = _luma(source), _luma(edited)
    d_s, d_e = np.diff(y_s, axis=0), np.diff(y_e, axis=0)
    corr = _pearson(d_s, d_e)
    if corr is None:
        both_still = float(d_s.std(dtype=np.float64)) < _FLAT_STD and float(d_e.std(dtype=np.float64)) < _FLAT_STD
        motion = 1.0 if both_still else 0.0
    else:
        motion = max(0.0, corr)
    offsets = y_e.mean(axis=(1, 2), dtype=np.float64) - y_s.mean(axis=(1, 2), dtype=np.float64)
    flicker = float(np.std(offsets))
    return 10.0 * motion * float(np.exp(-flicker / _FLICKER_SCALE))


def _check_frames(name: str, frames: np.ndarray) -> str | None:
    if not isinstance(frames, np.ndarray):
        return f"{name} must be a numpy array, got {type(frames).__name__}"
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        return f"{name} must be uint8 (F, H, W, 3) with F >= 1, got {frames.dtype} {frames.shape}"
    return None


def score_item(item: PixelInput) -> PixelResult:
    """Score one item; failures come back as a result with ``error`` set."""
    problem = _check_frames("source", item.source) or _check_frames("edited", item.edited)
    if problem is None and item.source.shape != item.edited.shape:
        problem = (
            f"source and edited videos differ in shape: source {tuple(item.source.shape)} "
            f"vs edited {tuple(item.edited.shape)} (frames, height, width, channels)"
        )
    if problem is not None:
        return PixelResult(item_id=item.item_id, error=problem)
    source, edited = _to_float(item.source), _to_float(item.edited)
    dimensions = {
        "instruction_following": instruction_following(item.instruction, source, edited),
        "preservation": preservation(source, edited),
        "temporal_consistency": temporal_consistency(source, edited),
        "detail_preservation": detail_preservation(source, edited),
    }
    return PixelResult(item_id=item.item_id, dimensions=dimensions)


def score_batch(items: list[PixelInput]) -> list[PixelResult]:
    """Score items independently, in order; one bad item never fails the others."""
    results: list[PixelResult] = []
    for item in items:
        try:
            results.append(score_item(item))
        except Exception as exc:  # noqa: BLE001 - an item's failure must be reported, not raised
            logger.exception("pixel backend failed on item %r", item.item_id)
            results.append(PixelResult(item_id=item.item_id, error=f"pixel backend error: {type(exc).__name__}: {exc}"))
    return results


class PixelBackend:
    """The pixel backend behind the :class:`editrl.reward_server.backends.Backend` interface.

    Args:
        latency_s: extra seconds each :meth:`score_batch` call takes (a sleep after
            scoring), to stand in for a slow judge in benchmarks; 0 adds nothing.
    """

    name = BACKEND_NAME
    version = BACKEND_VERSION
    dimensions = DIMENSIONS
    remote = False

    def __init__(self, latency_s: float = 0.0) -> None:
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        self.latency_s = latency_s

    def score_batch(self, items: list[PixelInput]) -> list[PixelResult]:
        results = score_batch(items)
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        return results
