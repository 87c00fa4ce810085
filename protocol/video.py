"""Video <-> bytes with PyAV (H.264 in mp4), used on the wire and on disk; still images with Pillow.

Frames are always ``uint8`` arrays of shape ``(F, H, W, 3)`` in RGB order, images ``(H, W, 3)``.
"""
from __future__ import annotations

import io

import av
import numpy as np
from PIL import Image, UnidentifiedImageError


class VideoDecodeError(ValueError):
    """Raised when bytes are not a decodable video with at least one frame."""


class ImageDecodeError(ValueError):
    """Raised when bytes are not a decodable still image."""


# Largest accepted reference image, in pixels (guards against decompression bombs).
MAX_IMAGE_PIXELS = 4096 * 4096


def encode_mp4(frames: np.ndarray, fps: int = 8, crf: int = 10) -> bytes:
    """Encode frames as an H.264 mp4.

    Args:
        frames: ``uint8`` array ``(F, H, W, 3)``, RGB; H and W must be even
            (yuv420p chroma subsampling).
        fps: frames per second written into the container.
        crf: x264 constant rate factor (0 = lossless luma, 10 = near lossless).

    Returns:
        The mp4 file as bytes. Encoding is single-threaded so that the same
        frames give the same bytes.

    Raises:
        ValueError: wrong dtype, rank, channel count or odd frame size.
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    num_frames, height, width, _ = frames.shape
    if num_frames < 1 or height % 2 or width % 2:
        raise ValueError(f"need >= 1 frame and even H, W; got {frames.shape}")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
        stream.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def decode_video(data: bytes, what: str = "video") -> np.ndarray:
    """Decode any container/codec PyAV reads into RGB frames.

    Args:
        data: the file's bytes.
        what: a name for the video used in error messages (e.g. an item id).

    Returns:
        ``uint8`` array ``(F, H, W, 3)``.

    Raises:
        VideoDecodeError: the bytes are empty, not a video, or hold no frames.
    """
    if not data:
        raise VideoDecodeError(f"{what}: empty video bytes")
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{what}: no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as exc:  # PyAV raises FFmpegError subclasses
        raise VideoDecodeError(f"{what}: cannot decode video ({exc})") from exc
    if not frames:
        raise VideoDecodeError(f"{what}: video has no frames")
    return np.stack(frames)


def read_video(path: str) -> np.ndarray:
    """Read a video file from disk; see :func:`decode_video` (errors name the path)."""
    with open(path, "rb") as handle:
        return decode_video(handle.read(), what=str(path))


def decode_image(data: bytes, what: str = "image") -> np.ndarray:
    """Decode a PNG or JPEG file into an RGB array.

    Args:
        data: the file's bytes.
        what: a name for the image used in error messages.

    Returns:
        ``uint8`` array ``(H, W, 3)``.

    Raises:
        ImageDecodeError: empty, not an image, or larger than ``MAX_IMAGE_PIXELS``.
    """
    if not data:
        raise ImageDecodeError(f"{what}: empty image bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise ImageDecodeError(f"{what}: image of {image.width}x{image.height} pixels is too large")
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{what}: cannot decode image ({exc})") from exc
