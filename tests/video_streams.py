"""Blank H.264 videos in several containers, encoded fast, for decode-budget tests.

An mp4 declares its frame count in its header; a raw H.264 stream (``h264``, Annex B)
and MPEG-TS (``mpegts``) declare none, so a decoder learns it only by decoding.
"""
from __future__ import annotations

import io

import av
import numpy as np


def blank_video(num_frames: int, width: int, height: int, container: str = "mp4") -> bytes:
    """``num_frames`` black ``width`` x ``height`` frames as H.264 in ``container``
    (x264 ``ultrafast``: 240 frames of 1280x720 encode in about 0.4 s into ~8 KB)."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container) as output:
        stream = output.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "threads": "1"}
        black = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24").reformat(format="yuv420p")
        for index in range(num_frames):
            black.pts = index
            for packet in stream.encode(black):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return buffer.getvalue()
