"""Hand-written content of the bundled dataset: pictures, captions, instructions.

Everything here is plain data; :mod:`editrl.tools.dataset.build` turns it into clips and
prompt tables. Captions are built from three parts so that every caption
describes both the picture and the camera motion:

- ``source_caption = f"{picture.content}, {motion phrase}."``
- colour edit: ``f"{picture.content}, {template.target_phrase}, {motion phrase}."``
- free-form edit: ``f"{edit.target}, {motion phrase}."``
"""
from __future__ import annotations

from dataclasses import dataclass

from editrl.protocol.edits import CHECKABLE_EDIT_TYPES

MOTIONS: tuple[str, ...] = ("pan_lr", "pan_tb", "zoom_in", "zoom_out")
"""Camera motions: pan left->right, pan (tilt) top->bottom, zoom in, zoom out."""

EDIT_CATEGORIES: tuple[str, ...] = ("colour", "add", "remove", "replace", "style", "background")
FREE_EDIT_CATEGORIES: tuple[str, ...] = ("add", "remove", "replace", "style", "background")
HELDOUT_PICTURES: tuple[str, ...] = ("coffee", "motorcycle_left")


@dataclass(frozen=True)
class FreeEdit:
    """A non-checkable edit written for one picture.

    Attributes:
        category: one of :data:`FREE_EDIT_CATEGORIES` (also used as ``edit_type``).
        instruction: the editing instruction.
        target: the content description of the edited picture (no motion phrase,
            no final period).
    """

    category: str
    instruction: str
    target: str


@dataclass(frozen=True)
class ColourTemplate:
    """One phrasing of a checkable colour edit.

    Attributes:
        instruction: the editing instruction.
        target_phrase: appended to the picture content in the target caption.
        category: ``"colour"``, or ``"style"`` for a look-based phrasing.
    """

    instruction: str
    target_phrase: str
    category: str = "colour"


@dataclass(frozen=True)
class Picture:
    """A source picture shipped in scikit-image's data directory.

    Attributes:
        name: short id, also the clip id prefix.
        filename: file name inside ``skimage/data``.
        content: one clause describing the picture (capitalised, no period).
        focus: ``(row, col)`` of the zoom target as fractions of the height/width.
        zoom_subject: what the zoom target is, for captions ("her face").
        motions: the 3 camera motions rendered for this picture.
        edits: 4 hand-written non-checkable edits.
        credit: where the picture comes from.
        licence: its licence as stated by scikit-image.
    """

    name: str
    filename: str
    content: str
    focus: tuple[float, float]
    zoom_subject: str
    motions: tuple[str, str, str]
    edits: tuple[FreeEdit, FreeEdit, FreeEdit, FreeEdit]
    credit: str
    licence: str


def motion_phrase(motion: str, zoom_subject: str) -> str:
    """The caption clause for a camera motion (no leading comma, no period)."""
    phrases = {
        "pan_lr": "as the camera pans slowly from left to right",
        "pan_tb": "as the camera tilts slowly from top to bottom",
        "zoom_in": f"as the camera slowly zooms in on {zoom_subject}",
        "zoom_out": f"as the camera slowly zooms out from {zoom_subject}",
    }
    if motion not in phrases:
        raise ValueError(f"unknown camera motion {motion!r}; expected one of {MOTIONS}")
    return phrases[motion]


# Style-type phrasings come first: each split cycles through the templates of a
# type from index 0, so the held-out split always contains them.
COLOUR_TEMPLATES: dict[str, tuple[ColourTemplate, ...]] = {
    "brighten": (
        ColourTemplate("Make the video brighter", "shown brighter overall"),
        ColourTemplate("Increase the brightness of the scene", "with increased brightness"),
        ColourTemplate("Brighten the whole shot", "brightened throughout"),
        ColourTemplate("Raise the exposure so that everything looks lighter",
                       "with a higher exposure so that everything looks lighter"),
    ),
    "darken": (
        ColourTemplate("Make the video darker", "shown darker overall"),
        ColourTemplate("Darken the whole scene", "darkened throughout"),
        ColourTemplate("Lower the brightness of the shot", "with lowered brightness"),
        ColourTemplate("Reduce the exposure so that everything looks dimmer",
                       "with a lower exposure so that everything looks dimmer"),
    ),
    "grayscale": (
        ColourTemplate("Make it look like an old black-and-white film",
                       "in the look of an old black-and-white film", "style"),
        ColourTemplate("Convert the video to grayscale", "in grayscale"),
        ColourTemplate("Make the video black and white", "in black and white"),
        ColourTemplate("Remove all colour from the video", "with all colour removed, in shades of grey"),
        ColourTemplate("Desaturate the footage completely so that only shades of grey remain",
                       "in shades of grey only"),
    ),
    "saturate": (
        ColourTemplate("Make the colours more saturated", "with more saturated colours"),
        ColourTemplate("Boost the colour saturation", "with boosted colour saturation"),
        ColourTemplate("Make the colours more vivid and intense", "with more vivid, intense colours"),
        ColourTemplate("Increase the saturation of the whole video", "with increased saturation throughout"),
    ),
    "warm": (
        ColourTemplate("Give the footage a warm golden-hour look", "with a warm golden-hour look", "style"),
        ColourTemplate("Make the colours warmer", "with warmer colours"),
        ColourTemplate("Give the video a warm orange tint", "with a warm orange tint"),
        ColourTemplate("Shift the colour balance towards warm tones",
                       "with the colour balance shifted towards warm tones"),
        ColourTemplate("Add a warm amber colour cast to the scene", "with a warm amber colour cast"),
    ),
    "cool": (
        ColourTemplate("Make the colours cooler", "with cooler colours"),
        ColourTemplate("Give the video a cool blue tint", "with a cool blue tint"),
        ColourTemplate("Shift the colour balance towards cool blue tones",
                       "with the colour balance shifted towards cool blue tones"),
        ColourTemplate("Add a cold bluish colour cast to the scene", "with a cold bluish colour cast"),
    ),
}
assert tuple(COLOUR_TEMPLATES) == CHECKABLE_EDIT_TYPES

_ASTRONAUT = "A smiling astronaut in an orange spacesuit poses in front of an American flag"
_COFFEE = "A cup of espresso in a red cup and saucer"
_CAT = "A close-up of a tabby cat with green eyes and a pink nose"
_ROCKET = "A Falcon 9 rocket stands on its launch pad at dusk"
_MOTO = "A red motorcycle stands on its kickstand"
_HUBBLE = "The Hubble eXtreme Deep Field"
_RETINA = "A fundus photograph of a human retina, an orange-red disc crossed by"
_IHC = "A microscope image of stained colon tissue"

PICTURES: tuple[Picture, ...] = (
    Picture(
        "astronaut", "astronaut.png",
        f"{_ASTRONAUT}, with a space shuttle model behind her and a black helmet at her side",
        (0.30, 0.45), "her face", ("zoom_in", "pan_tb", "zoom_out"),
        (
            FreeEdit("replace", "Replace the American flag with a plain red banner",
                     "A smiling astronaut in an orange spacesuit poses in front of a plain red banner, "
                     "with a space shuttle model behind her and a black helmet at her side"),
            FreeEdit("remove", "Remove the space shuttle model from the background",
                     f"{_ASTRONAUT} against a plain grey backdrop, with a black helmet at her side"),
            FreeEdit("add", "Put a pair of aviator sunglasses on the astronaut",
                     "A smiling astronaut wearing aviator sunglasses and an orange spacesuit poses in front "
                     "of an American flag, with a space shuttle model behind her and a black helmet at her side"),
            FreeEdit("background", "Change the background to the surface of the Moon with the Earth in the sky",
                     "A smiling astronaut in an orange spacesuit poses on the grey surface of the Moon with "
                     "the Earth hanging in the black sky, with a black helmet at her side"),
        ),
        "NASA Great Images database (Eileen Collins, NASA portrait)",
        "public domain (no known copyright restrictions)",
    ),
    Picture(
        "coffee", "coffee.png",
        f"{_COFFEE} with a silver spoon sits on a wooden cafe table",
        (0.40, 0.48), "the cup", ("pan_lr", "zoom_in", "zoom_out"),
        (
            FreeEdit("add", "Add heart-shaped latte art on top of the coffee",
                     "A cup of coffee topped with heart-shaped latte art in a red cup and saucer with a "
                     "silver spoon sits on a wooden cafe table"),
            FreeEdit("remove", "Remove the spoon from the saucer",
                     f"{_COFFEE} sits on a wooden cafe table, with no spoon on the saucer"),
            FreeEdit("style", "Turn the video into a watercolour painting",
                     "A watercolour painting of a cup of espresso in a red cup and saucer with a silver "
                     "spoon on a wooden cafe table"),
            FreeEdit("background", "Replace the wooden table with a white marble countertop",
                     f"{_COFFEE} with a silver spoon sits on a white marble countertop"),
        ),
        "Pikolo Espresso Bar, photograph by Rachel Michetti",
        "CC0 (no copyright restrictions)",
    ),
    Picture(
        "chelsea", "chelsea.png",
        f"{_CAT} looking just past the camera",
        (0.42, 0.55), "the cat's eyes", ("pan_lr", "zoom_in", "pan_tb"),
        (
            FreeEdit("add", "Add a small red bow on the cat's head",
                     "A close-up of a tabby cat with a small red bow on its head, green eyes and a pink nose "
                     "looking just past the camera"),
            FreeEdit("background", "Change the background to a snowy garden",
                     f"{_CAT} in front of a snowy garden"),
            FreeEdit("replace", "Replace the cat's green eyes with bright blue eyes",
                     "A close-up of a tabby cat with bright blue eyes and a pink nose looking just past the camera"),
            FreeEdit("style", "Render the cat as a Japanese woodblock print",
                     "A Japanese woodblock print of a tabby cat with green eyes and a pink nose looking just "
                     "past the camera"),
        ),
        "Chelsea the cat, photograph by Stefan van der Walt",
        "CC0 (no copyright restrictions)",
    ),
    Picture(
        "rocket", "rocket.jpg",
        f"{_ROCKET} between tall lattice towers, lit by bright floodlights under a deep blue sky",
        (0.45, 0.50), "the rocket", ("pan_tb", "pan_lr", "zoom_in"),
        (
            FreeEdit("add", "Add a plume of fire and smoke at the base of the rocket as it lifts off",
                     "A Falcon 9 rocket lifts off from its launch pad at dusk on a plume of fire and smoke, "
                     "between tall lattice towers under a deep blue sky"),
            FreeEdit("remove", "Remove the thin lattice tower to the left of the rocket",
                     f"{_ROCKET} with open sky where the lattice tower to its left stood, lit by bright "
                     "floodlights under a deep blue sky"),
            FreeEdit("background", "Replace the dusk sky with a starry night sky",
                     "A Falcon 9 rocket stands on its launch pad between tall lattice towers, lit by bright "
                     "floodlights under a starry night sky"),
            FreeEdit("style", "Make it look like a retro comic-book illustration",
                     "A retro comic-book illustration of a Falcon 9 rocket on its launch pad at dusk between "
                     "tall lattice towers, lit by bright floodlights"),
        ),
        "SpaceX Photos on Flickr (Falcon 9 launch carrying DSCOVR)",
        "public domain (released by SpaceX)",
    ),
    Picture(
        "motorcycle_left", "motorcycle_left.png",
        f"{_MOTO} in a garage, with shelves of cardboard boxes and tools behind it",
        (0.60, 0.55), "its engine", ("pan_lr", "zoom_out", "pan_tb"),
        (
            FreeEdit("replace", "Change the motorcycle's red paint to matte black",
                     "A matte black motorcycle stands on its kickstand in a garage, with shelves of cardboard "
                     "boxes and tools behind it"),
            FreeEdit("add", "Add a black helmet resting on the motorcycle's seat",
                     "A red motorcycle with a black helmet resting on its seat stands on its kickstand in a "
                     "garage, with shelves of cardboard boxes and tools behind it"),
            FreeEdit("remove", "Remove the cardboard boxes from the shelves behind the motorcycle",
                     f"{_MOTO} in a garage, in front of shelves holding only a few tools"),
            FreeEdit("background", "Move the motorcycle from the garage onto an empty desert highway",
                     f"{_MOTO} on an empty desert highway"),
        ),
        "Middlebury 2014 stereo benchmark (Scharstein et al., GCPR 2014), left view, downsampled 4x",
        "no licence terms stated by scikit-image; cite Scharstein et al. (GCPR 2014)",
    ),
    Picture(
        "hubble_deep_field", "hubble_deep_field.jpg",
        f"{_HUBBLE}, thousands of distant galaxies scattered like coloured specks across black space",
        (0.50, 0.50), "the centre of the field", ("zoom_in", "zoom_out", "pan_lr"),
        (
            FreeEdit("add", "Add a bright comet with a long glowing tail streaking across the frame",
                     f"{_HUBBLE}, with a bright comet trailing a long glowing tail across thousands of distant "
                     "galaxies in black space"),
            FreeEdit("remove", "Remove all the reddish galaxies",
                     f"{_HUBBLE}, with only white and bluish galaxies scattered across black space"),
            FreeEdit("replace", "Replace the galaxies with glowing snowflakes",
                     "Thousands of small glowing snowflakes scattered across black space"),
            FreeEdit("style", "Paint it in the style of Van Gogh's Starry Night with swirling brush strokes",
                     "A Van Gogh-style oil painting of countless galaxies in swirling brush strokes across "
                     "a dark sky"),
        ),
        "HubbleSite (NASA), Hubble eXtreme Deep Field",
        "public domain (NASA media guidelines)",
    ),
    Picture(
        "retina", "retina.jpg",
        f"{_RETINA} branching blood vessels with a bright optic disc on the left",
        (0.50, 0.50), "the macula", ("zoom_in", "pan_tb", "zoom_out"),
        (
            FreeEdit("add", "Add a thin white crosshair over the centre of the image",
                     f"{_RETINA} branching blood vessels with a bright optic disc on the left, with a thin "
                     "white crosshair over the centre"),
            FreeEdit("replace", "Make the blood vessels glowing neon blue",
                     f"{_RETINA} glowing neon-blue blood vessels with a bright optic disc on the left"),
            FreeEdit("style", "Redraw the retina as a pencil sketch on white paper",
                     "A pencil sketch on white paper of a human retina with branching blood vessels and the "
                     "optic disc on the left"),
            FreeEdit("background", "Fill the black surround outside the retina with plain white",
                     f"{_RETINA} branching blood vessels with a bright optic disc on the left, set on a plain "
                     "white surround"),
        ),
        "Wikimedia Commons, fundus photograph by Mikael Haggstrom",
        "CC0 1.0 Universal public domain dedication",
    ),
    Picture(
        "ihc", "ihc.png",
        f"{_IHC}, brown-stained glands surrounded by pale connective tissue with blue nuclei",
        (0.78, 0.60), "a round gland", ("pan_lr", "pan_tb", "zoom_in"),
        (
            FreeEdit("add", "Add a black scale bar in the bottom right corner",
                     f"{_IHC}, brown-stained glands surrounded by pale connective tissue with blue nuclei, "
                     "with a black scale bar in the bottom right corner"),
            FreeEdit("replace", "Replace the brown staining with bright green fluorescent staining",
                     "A microscope image of colon tissue, glands with bright green fluorescent staining "
                     "surrounded by pale connective tissue with blue nuclei"),
            FreeEdit("remove", "Remove the blue nuclei from the connective tissue",
                     f"{_IHC}, brown-stained glands surrounded by pale connective tissue with no visible nuclei"),
            FreeEdit("style", "Make it look like a stained-glass mosaic",
                     "A stained-glass mosaic of brown glands surrounded by pale tissue with blue specks"),
        ),
        "Center for Microscopy And Molecular Imaging (CMMI), IHC staining of colonic glands",
        "no known copyright restrictions",
    ),
)
