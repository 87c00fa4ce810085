"""The pixel reward backend against hand-worked numbers.

Frames are tiny uint8 videos. Values are chosen so that the measured changes are
exact fractions: 51 / 255 = 0.2 exactly, so shifting 6 of 8 columns by 51 moves
the mean by 0.2 * 6/8 = 0.15.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from editrl.reward_server.backends.pixel import (
    PixelInput,
    detect_edit_type,
    instruction_following,
    overshoot_score,
    preservation,
    score_batch,
    temporal_consistency,
)


def rgb_video(r, g, b, frames: int = 2) -> np.ndarray:
    """(F, H, W, 3) uint8 from three (H, W) channel arrays, repeated over frames."""
    image = np.stack([np.asarray(c, dtype=np.int64) for c in (r, g, b)], axis=-1)
    assert image.min() >= 0 and image.max() <= 255
    return np.repeat(image[None].astype(np.uint8), frames, axis=0)


def gray_video(values, frames: int = 2) -> np.ndarray:
    return rgb_video(values, values, values, frames)


def as_float(video: np.ndarray) -> np.ndarray:
    return video.astype(np.float32) / 255.0


def columns_shifted(base: int, shift: int, shifted_columns: int, width: int = 8, height: int = 2) -> np.ndarray:
    """(H, W) gray image: ``base`` everywhere, ``base + shift`` in the first columns."""
    image = np.full((height, width), base, dtype=np.int64)
    image[:, :shifted_columns] += shift
    return image


def follow(instruction: str, source: np.ndarray, edited: np.ndarray) -> float | None:
    return instruction_following(instruction, as_float(source), as_float(edited))


SOURCE_GRAY = gray_video(np.full((2, 8), 100))


def sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------- overshoot rule
@pytest.mark.parametrize(
    "u, expected",
    [
        (-1.0, 10 * 0.0024726232 / 0.8807970780),  # 10 sigmoid(-6) / sigmoid(2) = 0.0281
        (0.0, 10 * math.exp(-2)),                   # sigmoid(-a) / sigmoid(a) = e^-a: 1.3534
        (0.5, 5 / 0.8807970780),                    # 10 * 0.5 / sigmoid(2) = 5.6767
        (1.0, 10.0), (1.5, 10.0), (2.0, 5.0), (2.5, 0.0), (4.0, 0.0),
    ],
)
def test_overshoot_score(u, expected):
    # u <= 1: 10 sigmoid(4 (u - 0.5)) / sigmoid(2); 1 < u <= 1.5: 10;
    # u > 1.5: 10 * max(0, 1 - (u - 1.5)); e.g. u = 2 -> 10 * 0.5 = 5
    assert overshoot_score(u) == pytest.approx(expected, rel=1e-6)


def test_overshoot_score_ranks_every_shortfall():
    # strictly increasing below the target, so GRPO can rank edits that all fall short
    values = [overshoot_score(u) for u in (-2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(a < b for a, b in zip(values, values[1:]))


# ---------------------------------------------------------------- brighten / darken
@pytest.mark.parametrize(
    "shift, columns, expected",
    [
        (51, 6, 10.0),   # dY = 0.2 * 6/8 = 0.15 -> u = 1 -> 10
        (51, 3, 5 / 0.8807970780),  # dY = 0.2 * 3/8 = 0.075 -> u = 0.5 -> 10 * 0.5 / sigmoid(2)
        (102, 6, 5.0),   # dY = 0.4 * 6/8 = 0.3 -> u = 2 -> 10 * (1 - 0.5) = 5
        (-51, 6, 10 * 0.0024726232 / 0.8807970780),  # dY = -0.15 -> u = -1 -> 10 sigmoid(-6) / sigmoid(2)
        (0, 0, 10 * math.exp(-2)),  # unchanged video -> u = 0 -> 10 e^-2
    ],
)
def test_brighten(shift, columns, expected):
    edited = gray_video(columns_shifted(100, shift, columns))
    assert follow("Make the video brighter", SOURCE_GRAY, edited) == pytest.approx(expected, abs=1e-4)


def test_darken():
    # dY = -0.2 * 6/8 = -0.15, t = -0.15 -> u = 1 -> 10
    assert follow("Make it darker", SOURCE_GRAY, gray_video(columns_shifted(100, -51, 6))) == pytest.approx(10.0, abs=1e-4)
    # dY = -0.2 * 4/8 = -0.1 -> u = 2/3 -> 10 sigmoid(4 (2/3 - 1/2)) / sigmoid(2) = 10 * 0.66077 / 0.88080 = 7.502
    assert follow("Turn it into night", SOURCE_GRAY, gray_video(columns_shifted(100, -51, 4))) == pytest.approx(
        10 * sigmoid(2 / 3) / sigmoid(2), abs=1e-3
    )
    # brightening when asked to darken: u = -1 -> 10 sigmoid(-6) / sigmoid(2) = 0.028, near but above 0
    assert follow("Make it darker", SOURCE_GRAY, gray_video(columns_shifted(100, 51, 6))) == pytest.approx(
        10 * sigmoid(-6) / sigmoid(2), abs=1e-6
    )


# ---------------------------------------------------------------- grayscale / saturate
COLOR_SOURCE = rgb_video(np.full((2, 4), 200), np.full((2, 4), 100), np.full((2, 4), 100))  # C_s = 100/255


def test_grayscale_exact_gray_gives_10():
    # C_e = 0 -> m = 1 - 0 / C_s = 1 -> u = 1 / 0.8 = 1.25 (plateau) -> 10
    edited = gray_video(np.full((2, 4), 130))
    assert follow("Make it black and white", COLOR_SOURCE, edited) == pytest.approx(10.0)


def test_grayscale_half_way():
    # R 200 -> 150: C_e = 50/255 -> m = 1 - 0.5 = 0.5 -> u = 0.625
    # -> 10 sigmoid(4 * 0.125) / sigmoid(2) = 10 * 0.62246 / 0.88080 = 7.067
    edited = rgb_video(np.full((2, 4), 150), np.full((2, 4), 100), np.full((2, 4), 100))
    assert follow("Convert to greyscale", COLOR_SOURCE, edited) == pytest.approx(10 * sigmoid(0.5) / sigmoid(2), abs=1e-4)


def test_grayscale_of_gray_source_is_not_applicable():
    # mean C_s = 0 < 0.02 -> the chroma ratio is meaningless -> None
    assert follow("Make it monochrome", SOURCE_GRAY, SOURCE_GRAY) is None


def test_saturate():
    source = rgb_video(np.full((2, 4), 150), np.full((2, 4), 100), np.full((2, 4), 100))  # C_s = 50/255
    # R 150 -> 175: C_e = 75/255 -> m = 1.5 - 1 = 0.5 -> u = 1 -> 10
    edited = rgb_video(np.full((2, 4), 175), np.full((2, 4), 100), np.full((2, 4), 100))
    assert follow("Make the colours more vivid", source, edited) == pytest.approx(10.0, abs=1e-4)
    # R 150 -> 200: C_e = 100/255 -> m = 1 -> u = 2 -> 5
    edited = rgb_video(np.full((2, 4), 200), np.full((2, 4), 100), np.full((2, 4), 100))
    assert follow("increase saturation", source, edited) == pytest.approx(5.0, abs=1e-4)


# ---------------------------------------------------------------- warm / cool
def test_warm_and_cool():
    base = np.full((2, 8), 100)
    warmer = rgb_video(columns_shifted(100, 51, 6), base, base)  # d mean(R - B) = 0.2 * 6/8 = 0.15
    cooler = rgb_video(base, base, columns_shifted(100, 51, 6))  # d mean(R - B) = -0.15
    assert follow("Give it a warm golden look", SOURCE_GRAY, warmer) == pytest.approx(10.0, abs=1e-4)
    assert follow("Add an icy blue tint", SOURCE_GRAY, cooler) == pytest.approx(10.0, abs=1e-4)
    # the opposite change: u = -1 -> 10 sigmoid(-6) / sigmoid(2) = 0.028
    assert follow("Make it warmer", SOURCE_GRAY, cooler) == pytest.approx(10 * sigmoid(-6) / sigmoid(2), abs=1e-6)
    # half the target: R + 51 on 3 of 8 columns -> 0.075 -> u = 0.5 -> 10 * 0.5 / sigmoid(2) = 5.677
    half_warm = rgb_video(columns_shifted(100, 51, 3), base, base)
    assert follow("sunset tones please", SOURCE_GRAY, half_warm) == pytest.approx(5 / sigmoid(2), abs=1e-4)


# ---------------------------------------------------------------- detection
@pytest.mark.parametrize(
    "instruction, expected",
    [
        ("Make the video brighter", "brighten"),
        ("Make the scene sunnier", "brighten"),
        ("DARKEN the street", "darken"),
        ("Turn the scene into night", "darken"),
        ("Make it look like dusk", "darken"),
        ("a gloomy atmosphere", "darken"),
        ("Turn it into a black-and-white film", "grayscale"),
        ("black and white please", "grayscale"),
        ("Make it monochrome", "grayscale"),
        ("desaturate everything", "grayscale"),
        ("convert to greyscale", "grayscale"),
        ("Make the colors more vivid", "saturate"),
        ("make it more colourful", "saturate"),
        ("Increase saturation", "saturate"),
        ("boost the colours", "saturate"),
        ("Give it a warm look", "warm"),
        ("golden light", "warm"),
        ("add an orange tint", "warm"),
        ("sunset tones", "warm"),
        ("make it cooler", "cool"),
        ("add a blue tint", "cool"),
        ("a cold winter feel", "cool"),
        ("icy tones", "cool"),
        # unknown or mixed or negated -> None
        ("Add a cat on the sofa", None),
        ("Replace the car with a bicycle", None),
        ("Make it brighter but darker in the corners", None),
        ("warm and cold at once", None),
        ("Make it monochrome and more vivid", None),
        ("Don't darken the video", None),
        ("reduce the brightness", None),
        ("make it less gloomy", None),
    ],
)
def test_detect_edit_type(instruction, expected):
    assert detect_edit_type(instruction) == expected


def test_unknown_instruction_is_not_applicable():
    assert follow("Add a hat to the person", SOURCE_GRAY, gray_video(columns_shifted(100, 51, 6))) is None


# ---------------------------------------------------------------- preservation
def textured(frames: int = 3, size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 190, size=(size, size))
    return np.stack([gray_video(np.roll(image, t, axis=1), frames=1)[0] for t in range(frames)])


def test_preservation_invariant_to_brightness_contrast_tint():
    source = textured()
    s = source.astype(np.int64)
    brighter = np.clip(s + 40, 0, 255).astype(np.uint8)  # values <= 229: no clipping, exact shift
    lower_contrast = np.round((s - 128) * 0.5 + 128).astype(np.uint8)  # linear up to rounding
    tinted = s.copy()
    tinted[..., 0] += 30  # red tint: Y shifts by 0.299 * 30/255 everywhere
    tinted = tinted.astype(np.uint8)
    for edited in (source, brighter, tinted):
        assert preservation(as_float(source), as_float(edited)) == pytest.approx(10.0, abs=1e-4)
    assert preservation(as_float(source), as_float(lower_contrast)) > 9.95


def test_preservation_lower_for_shuffled_pixels():
    source = textured()
    rng = np.random.default_rng(1)
    flat = source.reshape(source.shape[0], -1, 3)
    shuffled = flat[:, rng.permutation(flat.shape[1])].reshape(source.shape)
    assert preservation(as_float(source), as_float(shuffled)) < 3.0


def test_preservation_flat_cases():
    source = textured()
    flat = np.full_like(source, 128)
    assert preservation(as_float(flat), as_float(source)) is None  # nothing to preserve
    assert preservation(as_float(source), as_float(flat)) == 0.0  # structure destroyed


# ---------------------------------------------------------------- temporal consistency
def test_temporal_identical_motion_gives_10():
    source = textured(frames=5)
    shifted = (source.astype(np.int64) + 30).astype(np.uint8)  # same motion, constant offset: d_e == d_s
    assert temporal_consistency(as_float(source), as_float(source)) == pytest.approx(10.0, abs=1e-6)
    assert temporal_consistency(as_float(source), as_float(shifted)) == pytest.approx(10.0, abs=1e-4)


def test_temporal_flicker_is_penalised():
    source = textured(frames=4)
    offsets = np.array([0, 20, 0, 20])[:, None, None, None]  # per-frame luma offsets 0, 20/255, 0, 20/255
    flicker = (source.astype(np.int64) + offsets).astype(np.uint8)
    # std_t of the offsets = 10/255 -> factor exp(-(10/255) / 0.05) = 0.45643; the motion correlation is < 1
    bound = 10.0 * math.exp(-(10 / 255) / 0.05)
    score = temporal_consistency(as_float(source), as_float(flicker))
    assert 0.0 < score < bound + 1e-6
    assert bound == pytest.approx(4.5643, abs=1e-3)


def test_temporal_unrelated_motion_is_low():
    source = textured(frames=5, seed=0)
    other = textured(frames=5, seed=7)[:, :, ::-1]  # different texture moving the other way
    assert temporal_consistency(as_float(source), as_float(other)) < 2.0


def test_temporal_single_frame_and_still_videos():
    still = gray_video(columns_shifted(100, 50, 4), frames=3)
    assert temporal_consistency(as_float(still[:1]), as_float(still[:1])) is None
    # both still: motion term 1; a constant offset does not flicker -> 10
    brighter_still = gray_video(columns_shifted(140, 50, 4), frames=3)
    assert temporal_consistency(as_float(still), as_float(brighter_still)) == pytest.approx(10.0)
    # still source, moving edit: motion term 0
    assert temporal_consistency(as_float(still), as_float(textured(frames=3, size=8)[:, :2])) == 0.0


# ---------------------------------------------------------------- score_batch
def test_score_batch_order_and_explicit_failures():
    source = textured(frames=3)
    items = [
        PixelInput("make it brighter", source, (source.astype(np.int64) + 38).astype(np.uint8), item_id="a"),
        PixelInput("make it brighter", source, source[:2], item_id="frames"),
        PixelInput("make it brighter", source, source[:, :, :8], item_id="size"),
        PixelInput("add a dog", source, source, item_id="b"),
    ]
    results = score_batch(items)
    assert [r.item_id for r in results] == ["a", "frames", "size", "b"]
    assert results[0].ok and set(results[0].dimensions) == {
        "instruction_following", "preservation", "temporal_consistency", "detail_preservation"
    }
    # dY = 38/255 = 0.149 -> u = 0.99346 -> 10 sigmoid(4 (u - 0.5)) / sigmoid(2) = 9.969
    u = (38 / 255) / 0.15
    assert results[0].dimensions["instruction_following"] == pytest.approx(10 * sigmoid(4 * (u - 0.5)) / sigmoid(2), abs=1e-3)
    assert results[0].dimensions["preservation"] == pytest.approx(10.0, abs=1e-4)
    for bad in results[1:3]:
        assert not bad.ok and bad.dimensions is None
        assert "(3, 16, 16, 3)" in bad.error and "differ in shape" in bad.error
    assert "(2, 16, 16, 3)" in results[1].error and "(3, 16, 8, 3)" in results[2].error
    assert results[3].ok and results[3].dimensions["instruction_following"] is None
    assert results[3].dimensions["preservation"] == pytest.approx(10.0, abs=1e-4)


def test_score_batch_rejects_wrong_dtype():
    source = textured(frames=2)
    (result,) = score_batch([PixelInput("brighter", source, source.astype(np.float32), item_id="x")])
    assert not result.ok and "uint8" in result.error


def test_deterministic():
    source = textured(frames=4)
    edited = np.clip(source.astype(np.int64) * 1.1, 0, 255).astype(np.uint8)
    first = score_batch([PixelInput("brighter", source, edited)])[0].dimensions
    second = score_batch([PixelInput("brighter", source.copy(), edited.copy())])[0].dimensions
    assert first == second


def test_identical_videos_score_exactly_ten_not_above():
    # the correlation of a video with itself can round to 1 + 2e-16; scores stay within 0-10
    rng = np.random.default_rng(3)
    video = as_float((rng.random((4, 6, 6, 3)) * 255).astype(np.uint8))
    for score in (preservation(video, video), temporal_consistency(video, video)):
        assert score <= 10.0 and score == pytest.approx(10.0, abs=1e-9)


def test_latency_option_sleeps_once_per_batch_and_keeps_scores_and_cache_keys(monkeypatch):
    # a benchmarking aid: the backend stands in for a slow judge without changing what it scores
    from editrl.reward_server.backends import build_backend, pixel
    from editrl.reward_server.backends.specs import PixelSpec
    from editrl.reward_server.reward_config import RewardConfig

    sleeps = []
    monkeypatch.setattr(pixel.time, "sleep", sleeps.append)
    items = [PixelInput(instruction="make it brighter", source=gray_video([[10, 20], [30, 40]], frames=3),
                        edited=gray_video([[60, 70], [80, 90]], frames=3), item_id=str(i)) for i in range(3)]
    plain, slow = build_backend(PixelSpec()), build_backend(PixelSpec(latency_s=0.25))
    assert PixelSpec().latency_s == 0.0
    assert [r.dimensions for r in slow.score_batch(items)] == [r.dimensions for r in plain.score_batch(items)]
    slow.score_batch(items[:1])
    assert sleeps == [0.25, 0.25]  # one per call, none for the default
    assert PixelSpec(latency_s=0.25).fingerprint() == PixelSpec().fingerprint()
    config = RewardConfig.model_validate({"version": "slow-1", "backends": {"pixel": {"type": "pixel", "latency_s": 0.5}}})
    assert config.backends["pixel"].latency_s == 0.5
    with pytest.raises(ValueError):
        PixelSpec(latency_s=-1.0)


# ---------------------------------------------------------------- detail_preservation


def _bundled_clip(name: str = "coffee_pan_lr") -> np.ndarray:
    from pathlib import Path

    from editrl.protocol.dataset import load_clip

    root = Path(__file__).resolve().parents[1]
    return load_clip(root / "assets" / "clips" / "clips" / f"{name}.mp4", 5, 64, 64, fps=4)


def _score(function, source_u8: np.ndarray, edited_u8: np.ndarray) -> float:
    return function(source_u8.astype(np.float32) / 255, edited_u8.astype(np.float32) / 255)


def test_detail_preservation_matches_scikit_image_ssim_of_standardised_luma():
    from skimage.metrics import structural_similarity

    from editrl.reward_server.backends.pixel import detail_preservation

    source = _bundled_clip()
    rng = np.random.default_rng(0)
    edited = np.clip(source.astype(np.int16) + rng.integers(-40, 41, source.shape), 0, 255).astype(np.uint8)

    def z(frames):  # luma, standardised per frame
        f = frames.astype(np.float64) / 255
        y = 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]
        return (y - y.mean(axis=(1, 2), keepdims=True)) / (y.std(axis=(1, 2), keepdims=True) + 1e-6)

    # the textbook SSIM map (Gaussian window sigma 1.5, K1 0.01, K2 0.03, dynamic range 1), per frame, all pixels
    maps = [structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
                                  full=True)[1] for a, b in zip(z(source), z(edited))]
    expected = 10 * max(0.0, float(np.mean(maps)))
    assert 1.0 < expected < 9.0
    # the backend's frames are float32 in [0, 1] (the server's conversion), the reference's float64
    assert _score(detail_preservation, source, edited) == pytest.approx(expected, rel=1e-6)


def test_a_blurred_copy_loses_detail_that_preservation_does_not_see():
    from editrl.protocol.dataset import resize_frames
    from editrl.reward_server.backends.pixel import detail_preservation

    source = _bundled_clip()
    blurred = resize_frames(resize_frames(source, 16, 16), 64, 64)  # 4 x 4 block average, upsampled
    assert _score(detail_preservation, source, source) == pytest.approx(10.0)
    assert _score(detail_preservation, source, blurred) < 5.0
    assert _score(preservation, source, blurred) > 8.0  # the older dimension barely notices the blur


@pytest.mark.parametrize("edit_type", ["brighten", "darken", "grayscale", "saturate", "warm", "cool"])
def test_an_exact_colour_edit_keeps_its_detail(edit_type):
    from editrl.protocol.edits import apply_edit
    from editrl.reward_server.backends.pixel import detail_preservation

    source = _bundled_clip()
    edited = np.round(apply_edit(source / 255.0, edit_type, 1.0) * 255).astype(np.uint8)
    # affine luma changes are standardised away; only clipping (brighten, saturate) costs a little
    assert _score(detail_preservation, source, edited) > 9.0


def test_detail_preservation_of_a_flat_source_does_not_apply():
    from editrl.reward_server.backends.pixel import detail_preservation

    flat = np.full((3, 16, 16, 3), 0.5, np.float32)
    assert detail_preservation(flat, flat) is None
    structured = np.random.default_rng(1).random((3, 16, 16, 3)).astype(np.float32)
    assert detail_preservation(structured, flat) == 0.0
