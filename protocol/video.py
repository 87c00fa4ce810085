"""Video <-> bytes with PyAV (H.264 in mp4), used on the wire and on disk; still images with Pillow.

Frames are always ``uint8`` arrays of shape ``(F, H, W, 3)`` in RGB order, images ``(H, W, 3)``.
Decoding can be bounded by a :class:`DecodeBudget` (the reward server's guard against a
small file of many large frames).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image, UnidentifiedImageError


class VideoDecodeError(ValueError):
    """Raised when bytes are not a decodable video with at least one frame."""


class VideoTooLargeError(VideoDecodeError):
    """Raised when a video holds more frames or pixels than its :class:`DecodeBudget` allows."""


class ImageDecodeError(ValueError):
    """Raised when bytes are not a decodable still image."""


def _mpx(pixels: int) -> str:
    """``55.3 Mpx`` (10^6 pixels), or ``10240 px`` below a megapixel."""
    return f"{pixels / 1e6:.1f} Mpx" if pixels >= 1_000_000 else f"{pixels} px"


@dataclass(frozen=True)
class DecodeBudget:
    """The most one video may decode to; ``None`` is no limit.

    Attributes:
        max_pixels: frames x height x width of the whole video (the decoded
            ``uint8`` RGB frames take 3 bytes per pixel).
        max_frames: number of frames.
    """

    max_pixels: int | None = None
    max_frames: int | None = None

    def max_frames_of(self, height: int, width: int) -> int | None:
        """Most frames of ``height`` x ``width`` within the budget (None: no limit)."""
        limits = [n for n in (self.max_frames, None if self.max_pixels is None else self.max_pixels // max(height * width, 1))
                  if n is not None]
        return min(limits) if limits else None

    def check(self, frames: int, height: int, width: int, what: str, note: str = "from the container's header") -> None:
        """Refuse ``frames`` frames of ``height`` x ``width`` pixels past the budget.

        Args:
            frames: number of frames; 0 checks the size of one frame alone.
            height, width: frame size in pixels.
            what: the video's name for the message.
            note: where the numbers come from, for the message.

        Raises:
            VideoTooLargeError: past ``max_frames`` or ``max_pixels``; the
                message gives the numbers, e.g. ``60 frames of 1280x720 = 55.3 Mpx
                > budget 50.0 Mpx``.
        """
        pixels = max(frames, 1) * height * width
        if self.max_pixels is not None and pixels > self.max_pixels:
            counted = f"{frames} frames of {width}x{height}" if frames else f"a frame of {width}x{height}"
            raise VideoTooLargeError(f"{what}: {counted} = {_mpx(pixels)} > budget {_mpx(self.max_pixels)} ({note})")
        if self.max_frames is not None and frames > self.max_frames:
            raise VideoTooLargeError(f"{what}: {frames} frames of {width}x{height} > budget {self.max_frames} frames ({note})")


# Largest accepted reference image, in pixels (guards against decompression bombs).
MAX_IMAGE_PIXELS = 4096 * 4096


X264_PARAMS = "bframes=0:mbtree=0"
"""Extra x264 settings of :func:`encode_mp4`: no B-frames and no macroblock tree. With
x264's defaults, identical frames encoded single-threaded, in the same process or another,
give different bitstreams now and then, and the decoded pixels differ by up to ~15 levels,
so the reward of the same sample changed from run to run. The differences come from x264's
AVX-512 code (AMD EPYC here): with B-frames off alone, re-encoding a 12-frame 32x32 clip
after each of 600 encodes of 96x96 noise clips gave 20-30 different bitstreams in 8 of 10
processes, and a mix of clip sizes gave 11 in 5,000 re-encodes, but none in 5,000 with
x264's assembly capped at AVX2 or turned off. With the macroblock tree off as well: none
in 10 x 600 re-encodes of the first kind nor in 10,000 of the second (B-frames off alone
had passed 15,000 encodes of a quieter mix, and then failed in CI). Cost against B-frames
off alone: files 6-7 % larger for 33-frame 256x256 clips and 13 % for the 9-frame 128x128
training clips, at the same reconstruction error and speed."""


def encode_mp4(frames: np.ndarray, fps: int = 8, crf: int = 10) -> bytes:
    """Encode frames as an H.264 mp4.

    Args:
        frames: ``uint8`` array ``(F, H, W, 3)``, RGB; H and W must be even
            (yuv420p chroma subsampling).
        fps: frames per second written into the container.
        crf: x264 constant rate factor (0 = lossless luma, 10 = near lossless).

    Returns:
        The mp4 file as bytes. The same frames give the same bytes, in any
        process on machines where x264 picks the same SIMD code: encoding is
        single-threaded, the colour conversion is our own (:func:`rgb_to_yuv420p`)
        and x264 uses neither B-frames nor its macroblock tree (see
        :data:`X264_PARAMS`). x264's code for another instruction set can encode
        differently (its plain-C code changed 21 of the 24 bundled clips by 0.46
        code values on average).

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
        stream.options = {"crf": str(crf), "preset": "medium", "threads": "1", "x264-params": X264_PARAMS}
        stream.thread_count = 1
        for frame in frames:
            # our own colour conversion: PyAV's cached scaler gives run-to-run
            # differences once it has been used for decoding in the same process
            planes = rgb_to_yuv420p(frame)
            for packet in stream.encode(av.VideoFrame.from_ndarray(planes, format="yuv420p")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


# ITU-R BT.601, limited ("TV") range, the convention of yuv420p H.264 without colour tags.
_RGB_TO_YCBCR = np.array(
    [[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]], dtype=np.float64
)
_YCBCR_OFFSET = np.array([16.0, 128.0, 128.0])
_YCBCR_TO_RGB = np.linalg.inv(_RGB_TO_YCBCR)


def rgb_to_yuv420p(frame: np.ndarray) -> np.ndarray:
    """``uint8 (H, W, 3)`` RGB -> the ``(H * 3 / 2, W)`` uint8 plane layout of yuv420p
    (BT.601 limited range; chroma is the mean of each 2x2 block). Deterministic."""
    height, width, _ = frame.shape
    ycc = frame.astype(np.float64) / 255.0 @ _RGB_TO_YCBCR.T + _YCBCR_OFFSET
    y = ycc[..., 0]
    chroma = ycc[..., 1:].reshape(height // 2, 2, width // 2, 2, 2).mean(axis=(1, 3))
    u, v = chroma[..., 0], chroma[..., 1]
    planes = np.concatenate([y.reshape(-1), u.reshape(-1), v.reshape(-1)])
    return np.clip(np.round(planes), 0, 255).astype(np.uint8).reshape(height * 3 // 2, width)


_BAND_PIXELS = 1 << 16
"""Pixels :func:`yuv420p_to_rgb` converts per step: its float64 temporaries stay near
2 MB whatever the frame size (converting a whole 1280x720 frame at once peaked at 109 MiB)."""


def yuv420p_to_rgb(planes: np.ndarray, height: int, width: int, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`rgb_to_yuv420p` (chroma repeated over each 2x2 block).

    Args:
        planes: ``uint8`` yuv420p planes, ``(H * 3 / 2, W)`` or flat.
        height, width: frame size in pixels, both even.
        out: ``uint8 (H, W, 3)`` to write the result into (e.g. a row of a
            video's frame array); None allocates it.

    Returns:
        ``uint8 (H, W, 3)`` RGB (``out`` when given). A band of rows at a time
        goes through float64, with the same operations, row for row, as a
        whole-frame conversion, so the result is bit-identical to it.
    """
    flat = planes.reshape(-1)
    quarter = (height // 2) * (width // 2)
    y = flat[: height * width].reshape(height, width)
    u = flat[height * width : height * width + quarter].reshape(height // 2, width // 2)
    v = flat[height * width + quarter : height * width + 2 * quarter].reshape(height // 2, width // 2)
    if out is None:
        out = np.empty((height, width, 3), np.uint8)
    band = max(2, _BAND_PIXELS // max(width, 1) // 2 * 2)
    for top in range(0, height, band):
        bottom = min(height, top + band)
        ycc = np.empty((bottom - top, width, 3), np.float64)
        ycc[..., 0] = y[top:bottom]
        for channel, plane in ((1, u), (2, v)):
            ycc[..., channel] = np.repeat(np.repeat(plane[top // 2 : (bottom + 1) // 2], 2, axis=0), 2, axis=1)
        ycc -= _YCBCR_OFFSET
        rgb = ycc @ _YCBCR_TO_RGB.T
        rgb *= 255.0
        np.round(rgb, out=rgb)
        np.clip(rgb, 0, 255, out=rgb)
        out[top:bottom] = rgb
    return out


def _frame_to_rgb(frame: "av.VideoFrame", out: np.ndarray) -> None:
    """Write one decoded frame into ``out`` (``uint8 (H, W, 3)``)."""
    if frame.format.name == "yuv420p" and frame.width % 2 == 0 and frame.height % 2 == 0:
        yuv420p_to_rgb(frame.to_ndarray(format="yuv420p"), frame.height, frame.width, out=out)
    else:
        out[...] = frame.to_ndarray(format="rgb24")


def _decode_frames(container: "av.container.InputContainer", budget: DecodeBudget, declared: int, what: str) -> np.ndarray:
    """Decode the first video stream into one ``uint8 (F, H, W, 3)`` array, stopping
    (with :class:`VideoTooLargeError`) at the frame that passes ``budget``. The array
    is sized from the declared frame count (0: grown by doubling, within the budget)."""
    out: np.ndarray | None = None
    count = 0
    declares = f"{declared} frames" if declared else "no frame count"
    counted = f"counted while decoding, stopped there; the container declares {declares}"
    for frame in container.decode(video=0):
        height, width = frame.height, frame.width
        count += 1
        if out is not None and (height, width) != out.shape[1:3]:
            raise VideoDecodeError(f"{what}: frame {count} is {width}x{height}, the first was {out.shape[2]}x{out.shape[1]}")
        budget.check(count, height, width, what, note=counted)
        limit = budget.max_frames_of(height, width)
        if out is None:
            capacity = declared or 16
            out = np.empty((capacity if limit is None else min(capacity, limit), height, width, 3), np.uint8)
        elif count > len(out):
            grown = np.empty((2 * len(out) if limit is None else min(2 * len(out), limit), height, width, 3), np.uint8)
            grown[: len(out)] = out
            out = grown
        _frame_to_rgb(frame, out[count - 1])
    if out is None:
        raise VideoDecodeError(f"{what}: video has no frames")
    return out[:count]


def decode_video(data: bytes, what: str = "video", budget: DecodeBudget | None = None) -> np.ndarray:
    """Decode any container/codec PyAV reads into RGB frames.

    Args:
        data: the file's bytes.
        what: a name for the video used in error messages (e.g. an item id).
        budget: the most frames and pixels to decode; None is no limit. The
            frame count and size the container declares are checked before
            decoding, and decoding stops at the frame that passes the budget
            whatever the container declared (a missing or false count).

    Returns:
        ``uint8`` array ``(F, H, W, 3)``.

    Raises:
        VideoTooLargeError: the video passes ``budget``.
        VideoDecodeError: the bytes are empty, not a video, hold no frames, or
            change frame size mid-stream.
    """
    if not data:
        raise VideoDecodeError(f"{what}: empty video bytes")
    budget = budget if budget is not None else DecodeBudget()
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{what}: no video stream")
            stream = container.streams.video[0]
            declared = max(int(stream.frames or 0), 0)
            height, width = int(stream.codec_context.height or 0), int(stream.codec_context.width or 0)
            if height and width:
                budget.check(declared, height, width, what, note="from the container's header, before decoding")
            return _decode_frames(container, budget, declared, what)
    except VideoDecodeError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as exc:  # PyAV raises FFmpegError subclasses
        raise VideoDecodeError(f"{what}: cannot decode video ({exc})") from exc


def read_video(path: str) -> np.ndarray:
    """Read a video file from disk; see :func:`decode_video` (errors name the path)."""
    with open(path, "rb") as handle:
        return decode_video(handle.read(), what=str(path))


class TimedFrames:
    """The frames of a video file's first video stream with their presentation times, decoded lazily.

    Use as a context manager; iterating yields ``(time_s, frame)`` in presentation order, where
    ``time_s`` is the frame's presentation time (``pts * time_base``) in seconds minus that of the
    first frame (so the first frame is at 0 s whatever the container's start offset), and ``frame``
    is the decoded ``av.VideoFrame``; :meth:`rgb` turns one into ``uint8 (H, W, 3)`` exactly as
    :func:`decode_video` does. A frame without a timestamp gets ``index / rate``.

    Attributes:
        rate: the stream's average frame rate in frames per second (``stream.average_rate``), or None
            when the container does not say.

    Raises:
        FileNotFoundError: the file does not exist (on entering).
        VideoDecodeError: not a decodable video, or no video stream (message names the path); also
            raised while iterating when the data is corrupt or frames have neither time nor rate.
    """

    def __init__(self, path: str):
        self.path = str(path)
        self.rate: float | None = None
        self._container = None

    def __enter__(self) -> "TimedFrames":
        with open(self.path, "rb"):  # FileNotFoundError / IsADirectoryError as the OS says
            pass
        try:
            self._container = av.open(self.path, mode="r")
        except (av.error.FFmpegError, ValueError, OSError) as exc:
            raise VideoDecodeError(f"{self.path}: cannot decode video ({exc})") from exc
        if not self._container.streams.video:
            self._container.close()
            raise VideoDecodeError(f"{self.path}: no video stream")
        rate = self._container.streams.video[0].average_rate
        self.rate = float(rate) if rate else None
        return self

    def __exit__(self, *exc_info) -> None:
        if self._container is not None:
            self._container.close()

    def __iter__(self):
        first: float | None = None
        try:
            for index, frame in enumerate(self._container.decode(video=0)):
                if frame.pts is not None and frame.time_base is not None:
                    time_s = float(frame.pts * frame.time_base)
                elif self.rate:
                    time_s = index / self.rate
                else:
                    raise VideoDecodeError(f"{self.path}: frame {index} has no timestamp and the stream no frame rate")
                first = time_s if first is None else first
                yield time_s - first, frame
        except (av.error.FFmpegError, OSError) as exc:
            raise VideoDecodeError(f"{self.path}: cannot decode video ({exc})") from exc

    @staticmethod
    def rgb(frame: "av.VideoFrame") -> np.ndarray:
        """One decoded frame as ``uint8 (H, W, 3)`` RGB (the conversion of :func:`decode_video`)."""
        out = np.empty((frame.height, frame.width, 3), np.uint8)
        _frame_to_rgb(frame, out)
        return out


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
