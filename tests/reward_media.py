"""Real test media: camera motion over scikit-image photographs, encoded as mp4."""
from __future__ import annotations

import numpy as np
from PIL import Image
from skimage import data as skdata

from editrl.protocol.reward import ScoreItem, VideoPayload
from editrl.protocol.video import decode_video, encode_mp4


def camera_pan(frames: int = 6, size: int = 64, step: int = 4, picture: str = "astronaut") -> np.ndarray:
    """A photograph seen by a camera panning right: ``uint8 (frames, size, size, 3)``."""
    image = getattr(skdata, picture)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    image = np.asarray(Image.fromarray(image[..., :3]).resize((128 + frames * step, 128)))
    crop = min(size, 128)
    clip = np.stack([image[10:10 + crop, t * step:t * step + crop] for t in range(frames)])
    if crop != size:
        clip = np.stack([np.asarray(Image.fromarray(f).resize((size, size))) for f in clip])
    return clip


def wide_pan(frames: int = 8, width: int = 640, height: int = 480, picture: str = "astronaut") -> np.ndarray:
    """Frames larger than 512 px on their longer side (for downscaling checks)."""
    image = getattr(skdata, picture)()[..., :3]
    big = np.asarray(Image.fromarray(image).resize((width + 4 * frames, height)))
    return np.stack([big[:, 4 * t:4 * t + width] for t in range(frames)])


def brighter(frames: np.ndarray, amount: int = 40) -> np.ndarray:
    return np.clip(frames.astype(np.int64) + amount, 0, 255).astype(np.uint8)


def payload(frames: np.ndarray) -> VideoPayload:
    return VideoPayload.from_bytes(encode_mp4(frames))


def item(item_id: str, instruction: str, source: np.ndarray, edited: np.ndarray, **extra) -> ScoreItem:
    return ScoreItem(item_id=item_id, instruction=instruction, source=payload(source), edited=payload(edited), **extra)


def decoded(payload_: VideoPayload) -> np.ndarray:
    return decode_video(payload_.to_bytes())
