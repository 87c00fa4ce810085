"""Prompts, response schemas and tolerant parsing of the VLM-judge protocols.

Two protocols (see :class:`editrl.reward_server.backends.specs.GeminiSpec`):

* ``viva`` (VIVA, section on the VLM-judge reward): the instruction, the source
  video, the edited video and an optional reference image; 0-10 for
  instruction following, edit quality, source-video preservation and, only with
  a reference image, reference similarity; JSON with a short reason.
* ``rvedit`` (RVEDiT appendix, judge protocol): 5 frames of each video, source
  frames first; 1-100 for Instruction Compliance, Consistency & Detail Fidelity
  and Visual Quality & Stability, with a rubric for the edit's category (local
  change, remove, add, global style). Scores are divided by 10 (50 -> 5.0).

Parsing is tolerant: the JSON object may sit inside prose or a code fence, keys
may be spelled as in the rubric ("Consistency & Detail Fidelity") and numbers
may be strings or fractions ("85/100"). An answer without every score in range
raises :class:`Unparseable`.
"""
from __future__ import annotations

import json
import re
from typing import Any

from editrl.reward_server.backends.specs import RVEDIT_DIMENSIONS, VIVA_DIMENSIONS


class Unparseable(ValueError):
    """The judge's answer does not hold every required score in range."""


# ---------------------------------------------------------------- categories
_CATEGORY_PATTERNS = (
    ("remove", r"\b(remove|delete|erase|get rid of|take (?:out|away)|eliminate|without the)\b"),
    ("add", r"\b(add|insert|put|place|include|introduce)\b"),
    ("global_style", r"\b(style|styled|look like|turn (?:it|the (?:video|scene|clip)) into|convert|render|painting|"
                     r"cartoon|anime|sketch|watercolou?r|oil paint|pixel art|black[- ]and[- ]white|sepia|"
                     r"vintage|cinematic|night|winter|autumn|sunset|colou?r grade)\b"),
)

CATEGORY_RUBRICS = {
    "local_change": "Local change: the object or region named in the instruction changes as asked (attribute, colour, "
                    "material or replacement) while its position and motion and everything else in the frame stay as in "
                    "the source.",
    "remove": "Remove: the named object is gone in every edited frame, the uncovered background is filled in "
              "plausibly and consistently over time, with no ghosting or smears.",
    "add": "Add: the new object is present in every edited frame at a plausible place, scale and lighting, and moves "
           "consistently with the scene; the rest of the source is unchanged.",
    "global_style": "Global style: the whole video takes the requested look uniformly across frames, while the content, "
                    "layout and motion of the source are preserved.",
}


def infer_category(instruction: str) -> str:
    """The edit category of ``instruction``: ``remove``, ``add``, ``global_style`` or ``local_change``.

    Keyword rules, checked in that order; anything else is a local change.
    """
    for category, pattern in _CATEGORY_PATTERNS:
        if re.search(pattern, instruction, re.IGNORECASE):
            return category
    return "local_change"


# ---------------------------------------------------------------- prompts
def viva_prompt(instruction: str, has_reference: bool) -> str:
    """The VIVA-rubric judge prompt (the videos and the image follow as separate parts)."""
    reference = (
        "\n- reference_similarity: does the edited content match the reference image (appearance, identity, style)?"
        if has_reference else ""
    )
    shown = "the source video, the edited video and a reference image" if has_reference else "the source video and the edited video"
    return (
        "You are an expert judge of instruction-based video editing. You are given an editing instruction, "
        f"{shown}. Rate the edit on each criterion with an integer from 0 (worst) to 10 (best):\n"
        "- instruction_following: does the edited video carry out the instruction completely, and nothing else?\n"
        "- edit_quality: is the edited content visually plausible, clean and temporally stable (no artifacts, "
        "flicker or distortion)?\n"
        "- source_preservation: is everything the instruction does not ask to change kept as in the source video "
        "(identity, background, layout, motion)?"
        f"{reference}\n"
        "Answer with a JSON object holding these scores and a short `reason` (one or two sentences).\n\n"
        f"Instruction: {instruction}"
    )


def rvedit_prompt(instruction: str, category: str, frames_per_video: int) -> str:
    """The multi-frame judge prompt of the RVEDiT appendix protocol for one edit category."""
    n = frames_per_video
    return (
        "You are an expert judge of instruction-based video editing. You will see "
        f"{2 * n} frames: frames 1-{n} are sampled evenly from the source video, frames {n + 1}-{2 * n} from the "
        "edited video at the same times.\n"
        f"Instruction: {instruction}\n"
        f"Edit category rubric. {CATEGORY_RUBRICS[category]}\n"
        "Score each axis with an integer from 1 (worst) to 100 (best):\n"
        "- Instruction Compliance: the edit does what the instruction asks, judged with the category rubric.\n"
        "- Consistency & Detail Fidelity: everything not to be edited matches the source, details are sharp and "
        "the edit is consistent across frames.\n"
        "- Visual Quality & Stability: the edited frames look natural, free of artifacts, without flicker.\n"
        'Respond with JSON: {"instruction_compliance": <1-100>, "detail_fidelity": <1-100>, '
        '"visual_quality": <1-100>, "reason": "<one sentence>"}'
    )


def viva_schema(has_reference: bool) -> dict[str, Any]:
    """JSON schema enforced on the ``viva`` answer (``responseJsonSchema``)."""
    names = VIVA_DIMENSIONS if has_reference else VIVA_DIMENSIONS[:3]
    properties: dict[str, Any] = {name: {"type": "integer", "minimum": 0, "maximum": 10} for name in names}
    properties["reason"] = {"type": "string"}
    return {"type": "object", "properties": properties, "required": [*names, "reason"]}


def rvedit_schema() -> dict[str, Any]:
    """JSON schema requested for the ``rvedit`` answer (parsing stays tolerant)."""
    properties: dict[str, Any] = {name: {"type": "integer", "minimum": 1, "maximum": 100} for name in RVEDIT_DIMENSIONS}
    properties["reason"] = {"type": "string"}
    return {"type": "object", "properties": properties, "required": [*RVEDIT_DIMENSIONS, "reason"]}


# ---------------------------------------------------------------- parsing
_ALIASES = {
    "instruction_following": ("instruction_following", "instruction_compliance", "following"),
    "edit_quality": ("edit_quality", "editing_quality", "quality"),
    "source_preservation": ("source_preservation", "source_video_preservation", "preservation"),
    "reference_similarity": ("reference_similarity", "reference_image_similarity", "similarity"),
    "instruction_compliance": ("instruction_compliance", "instruction_following", "compliance"),
    "detail_fidelity": ("detail_fidelity", "consistency_detail_fidelity", "consistency_and_detail_fidelity",
                        "consistency_fidelity", "fidelity"),
    "visual_quality": ("visual_quality", "visual_quality_stability", "visual_quality_and_stability", "quality"),
}
_REASON_KEYS = ("reason", "reasoning", "explanation", "justification", "rationale")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _norm(key: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", key.lower().replace("&", "and")).strip("_")


def extract_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text`` (bare, fenced or inside prose), or None."""
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        for key in ("score", "value", "rating"):
            if key in value:
                return _number(value[key])
        return None
    if isinstance(value, str):
        match = _NUMBER.search(value)
        return float(match.group(0)) if match else None
    return None


def _flat_pairs(text: str, obj: dict[str, Any] | None) -> dict[str, Any]:
    """Normalised key -> value from the JSON object, then from ``key: value`` lines of the text."""
    pairs: dict[str, Any] = {}
    if obj is not None:
        for key, value in obj.items():
            pairs.setdefault(_norm(str(key)), value)
    for line in text.splitlines():
        match = re.match(r"^[\s\-*#>`\"']*([A-Za-z][A-Za-z &/_-]*?)[\s*\"'`]*[:=]\s*(.+)$", line)
        if match:
            pairs.setdefault(_norm(match.group(1)), match.group(2))
    return pairs


def parse_scores(text: str | None, names: tuple[str, ...], low: float, high: float) -> tuple[dict[str, float], str | None]:
    """Scores ``names`` (each in ``[low, high]``) and the reason from a judge's answer.

    Raises:
        Unparseable: empty answer, a score missing or out of range (the message
            says which and starts with the answer's first 200 characters).
    """
    if not text or not text.strip():
        raise Unparseable("empty answer")
    pairs = _flat_pairs(text, extract_json_object(text))
    scores: dict[str, float] = {}
    for name in names:
        value = next((pairs[alias] for alias in _ALIASES[name] if alias in pairs), None)
        number = _number(value)
        if number is None:
            raise Unparseable(f"no score for {name!r} in answer {text[:200]!r}")
        if not low <= number <= high:
            raise Unparseable(f"score {name!r} = {number} is outside [{low:g}, {high:g}] in answer {text[:200]!r}")
        scores[name] = number
    reason = next((str(pairs[key]) for key in _REASON_KEYS if key in pairs), None)
    return scores, (reason[:500] if reason else None)


def parse_viva(text: str | None, has_reference: bool) -> tuple[dict[str, float | None], str | None]:
    """0-10 VIVA dimensions (``reference_similarity`` None without a reference image) and the reason."""
    names = VIVA_DIMENSIONS if has_reference else VIVA_DIMENSIONS[:3]
    scores, reason = parse_scores(text, names, 0.0, 10.0)
    dimensions: dict[str, float | None] = {name: scores.get(name) for name in VIVA_DIMENSIONS}
    return dimensions, reason


def parse_rvedit(text: str | None) -> tuple[dict[str, float | None], str | None]:
    """RVEDiT dimensions mapped from 1-100 to 0-10 (divided by 10) and the reason."""
    scores, reason = parse_scores(text, RVEDIT_DIMENSIONS, 0.0, 100.0)
    return {name: scores[name] / 10.0 for name in RVEDIT_DIMENSIONS}, reason
