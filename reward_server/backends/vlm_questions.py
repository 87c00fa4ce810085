"""The ReViSE-style Yes/No protocol: questions, prompts, and the map from Yes/No logits to 0-10.

ReViSE asks an open VLM, for each of four dimensions (edit accuracy,
preservation consistency, generation naturalness, generation realism), whether
the edit satisfies it, answering Yes or No (optionally after a short
reasoning), and reads the soft answer from the logits of the two tokens:
``p = sigmoid(l_yes - l_no)``. The same probability for the self-comparison pair
(source, source) is subtracted, so that leaving the video unchanged scores the
same as doing nothing: ``d = p_edit - p_self`` in [-1, 1].

Map to 0-10 (``mapping``): ``shifted`` (default) ``5 (1 + d)``, linear over all of
[-1, 1], so an unchanged video scores 5 on every dimension, better than doing
nothing is above 5 and worse below; ``clipped`` ``10 clip(d, 0, 1)``, where
nothing at or below the unchanged video earns reward. ``shifted`` is the
default because preservation, naturalness and realism of the self pair are
high by construction: clipping would send most of them to 0 and remove their
signal. Without ``relative`` the score is ``10 p_edit``.

Several spellings of each answer can be single tokens (``Yes``, `` Yes``); their
probabilities are summed: ``l_yes = logsumexp`` of their logits (likewise for No).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

QUESTIONS = {
    "edit_accuracy": "Does the edited video accurately carry out the instruction \"{instruction}\" on the source video?",
    "preservation": "Apart from what the instruction \"{instruction}\" asks to change, does the edited video keep the "
                    "source video unchanged (identity, background, layout, motion)?",
    "naturalness": "Does the edit look natural and coherent in the edited video, blending in seamlessly and "
                   "consistently over time?",
    "realism": "Does the edited video look realistic, free of artifacts, distortions and flicker?",
}
DIRECT_SUFFIX = "Answer with Yes or No."
REASONING_SUFFIX = "Think about it briefly, then give your final answer as \"Answer: Yes\" or \"Answer: No\"."
ANSWER_CUE = "\nAnswer:"
YES_WORDS = ("Yes", " Yes")
NO_WORDS = ("No", " No")


@dataclass(frozen=True)
class YesNoPrompt:
    """One question about one (source, edited) pair: frames as RGB images, source frames first."""

    source_frames: tuple[Image.Image, ...]
    edited_frames: tuple[Image.Image, ...]
    question: str
    """The full question, suffix included."""

    def content(self) -> list[dict]:
        """Chat content parts (``{"type": "text"|"image", ...}``) in the order the model sees them."""
        parts: list[dict] = [{"type": "text", "text": "Source video frames:"}]
        parts += [{"type": "image", "image": image} for image in self.source_frames]
        parts.append({"type": "text", "text": "Edited video frames:"})
        parts += [{"type": "image", "image": image} for image in self.edited_frames]
        parts.append({"type": "text", "text": self.question})
        return parts

    @property
    def images(self) -> list[Image.Image]:
        return [*self.source_frames, *self.edited_frames]


def question(dimension: str, instruction: str, reasoning: bool) -> str:
    """The question of ``dimension`` for ``instruction``, asking for a direct answer or a short reasoning first."""
    return f"{QUESTIONS[dimension].format(instruction=instruction)} {REASONING_SUFFIX if reasoning else DIRECT_SUFFIX}"


def reasoning_prefix(generated: str) -> str:
    """The assistant text to continue after reasoning: the reasoning up to any answer it gave, then the answer cue."""
    cut = generated.find("Answer")
    reasoning = (generated if cut < 0 else generated[:cut]).strip()
    return f"{reasoning}{ANSWER_CUE}" if reasoning else ANSWER_CUE.lstrip()


def sigmoid(x: float) -> float:
    """Logistic function, stable for large ``|x|``."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def margin_from_logprobs(candidates: list[tuple[str, float]]) -> float:
    """``l_yes - l_no`` from (token text, log-probability) alternatives of one position (e.g. top-k logprobs).

    Tokens whose text stripped of spaces is ``Yes`` or ``No`` (any case) count;
    log-probabilities differ from logits by the same constant, so their
    difference is the logit margin. When one answer is not among the
    alternatives, the smallest listed log-probability bounds it from above and
    is used in its place (the margin is then conservative).

    Raises:
        ValueError: neither Yes nor No is among the alternatives.
    """
    yes = [lp for token, lp in candidates if token.strip().lower() == "yes"]
    no = [lp for token, lp in candidates if token.strip().lower() == "no"]
    if not yes and not no:
        listed = [token for token, _ in candidates[:10]]
        raise ValueError(f"neither Yes nor No among the {len(candidates)} most likely tokens {listed}")
    floor = min(lp for _, lp in candidates)
    return logsumexp(yes or [floor]) - logsumexp(no or [floor])


def to_score(p_edit: float, p_self: float | None, mapping: str) -> float:
    """0-10 score from P(Yes) of the edit and of the self pair (None: not relative), see the module docstring."""
    if p_self is None:
        return 10.0 * p_edit
    d = p_edit - p_self
    if mapping == "shifted":
        return 5.0 * (1.0 + d)
    if mapping == "clipped":
        return 10.0 * min(1.0, max(0.0, d))
    raise ValueError(f"unknown mapping {mapping!r}")
