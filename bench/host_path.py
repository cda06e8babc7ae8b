"""Host-side cost per frame of each transport's way in and out of the engine, old path and new.

The ``stages`` suite measures the device; this measures the host work around it, which runs
on CPU threads beside the event loop and, at 30 fps times many sessions, decides how many
sessions one server's CPU can feed. For each path it times the real calls on one frame and
counts the host copies of the frame's pixels before it is uploaded (or after it comes back):

- ``websocket-in``: JPEG bytes → what the engine uploads. Before: decode to an array,
  the copy ``Session.submit`` made on the event loop, a fresh pinned copy at admission
  (then, for a while, 2: the array was handed over, not copied). Now: none, the JPEG decodes
  straight into the session's pinned buffer (:mod:`livediff.streams.frame_buffers`), which
  is uploaded as it is.
- ``webrtc-in``: a decoded ``yuv420p`` frame → what the engine uploads. Before: FFmpeg's
  YUV → RGB conversion, the submit copy, a pinned copy. Now: the three planes, copied once.
- ``webrtc-out``: an output → the ``yuv420p`` frame the encoder takes. Before: the RGB array
  wrapped and converted to YUV by FFmpeg. Now: the packed I420 (converted on the device).
- ``websocket-out``: an output → JPEG (unchanged; listed for scale).

Pinned copies use page-locked memory only where CUDA exists (otherwise ordinary memory:
the count of copies is the same, the time is not). Records: ``suite: "stages"``,
``side: "host"``, ``path``, ``version`` (``before`` / ``now``), ``host_copies``,
``ms_median``/``ms_p99`` over ``--frames`` repetitions, plus provenance.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np
import torch
from PIL import Image

from livediff.bench.records import environment, summarize
from livediff.streams.frame_buffers import FrameBuffers, decode_frame
from livediff.streams.media import yuv_frame_of
from livediff.wire import decode_jpeg, encode_jpeg

INPUT_SIZE = (480, 640)  # a camera frame (H, W)
OUTPUT_SIZE = (512, 512)


def _pin(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.pin_memory() if torch.cuda.is_available() else tensor.clone()


def _jpeg(height: int, width: int) -> bytes:
    rng = np.random.default_rng(1)
    image = np.clip(rng.normal(128, 40, (height, width, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _yuv420p(height: int, width: int) -> av.VideoFrame:
    rgb = np.random.default_rng(2).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")


def paths() -> dict[tuple[str, str], tuple[int, Callable[[], Any]]]:
    """``(path, version) → (host copies, one frame's host work)``."""
    height, width = INPUT_SIZE
    jpeg = _jpeg(height, width)
    frame = _yuv420p(height, width)
    pinned = torch.cuda.is_available()
    out_h, out_w = OUTPUT_SIZE
    rgb_out = np.random.default_rng(3).integers(0, 256, (out_h, out_w, 3), dtype=np.uint8)
    i420_out = np.random.default_rng(4).integers(0, 256, out_h * out_w * 3 // 2, dtype=np.uint8)

    def ws_in_before() -> Any:
        image = torch.from_numpy(decode_jpeg(jpeg)).clone()  # decode, then the submit copy
        return _pin(image)

    buffers = FrameBuffers(pinned=pinned)

    def ws_in_now() -> Any:
        return decode_frame(jpeg, buffers, max_pixels=None)  # into a pinned buffer: no copy

    def rtc_in_before() -> Any:
        image = torch.from_numpy(frame.to_ndarray(format="rgb24")).clone()
        return _pin(image)

    def rtc_in_now() -> Any:
        return yuv_frame_of(frame, pinned=pinned)

    def rtc_out_before() -> Any:
        return av.VideoFrame.from_ndarray(rgb_out, format="rgb24").reformat(format="yuv420p")

    def rtc_out_now() -> Any:
        return av.VideoFrame.from_ndarray(i420_out.reshape(out_h * 3 // 2, out_w), format="yuv420p")

    def ws_out() -> Any:
        return encode_jpeg(rgb_out)

    return {
        ("websocket-in", "before"): (3, ws_in_before),
        ("websocket-in", "now"): (0, ws_in_now),
        ("webrtc-in", "before"): (3, rtc_in_before),
        ("webrtc-in", "now"): (1, rtc_in_now),
        ("webrtc-out", "before"): (2, rtc_out_before),
        ("webrtc-out", "now"): (1, rtc_out_now),
        ("websocket-out", "now"): (1, ws_out),
    }


def run_host_stages(frames: int, warmup: int) -> list[dict[str, Any]]:
    """One record per (path, version); see the module docstring."""
    records = []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for (path, version), (copies, work) in paths().items():
        for _ in range(warmup):
            work()
        times = []
        for _ in range(frames):
            start = time.perf_counter()
            work()
            times.append((time.perf_counter() - start) * 1000.0)
        records.append(
            {
                "suite": "stages",
                "side": "host",
                "path": path,
                "version": version,
                "host_copies": copies,
                "input": f"{INPUT_SIZE[1]}x{INPUT_SIZE[0]}",
                "output": f"{OUTPUT_SIZE[1]}x{OUTPUT_SIZE[0]}",
                **summarize(times),
                **environment(device),
            }
        )
    return records
