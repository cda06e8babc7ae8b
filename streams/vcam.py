"""A virtual camera sink (pyvirtualcam): v4l2loopback on Linux, OBS on Windows and macOS.

>>> with VirtualCamera(512, 512, fps=30) as cam:          # any available device
...     cam.send(rgb_uint8_hwc)

Without a virtual-camera device, opening fails with a :class:`MediaError` that says how to
create one. ``backend="y4m"`` selects :class:`Y4MFileBackend`, registered with
``pyvirtualcam.register_backend`` on first use: it writes the frames to the ``device`` path
as a Y4M file with PyAV, which any player (and Chromium's ``--use-file-for-fake-video-capture``)
reads back. It is the test double for a real device.
"""

from __future__ import annotations

import logging
import platform
from fractions import Fraction
from typing import Any

import av
import numpy as np

from livediff.exceptions import MediaError, ParameterError
from livediff.streams.closing import ClosesOnExit

log = logging.getLogger(__name__)
Y4M_BACKEND = "y4m"

SETUP_HELP = {
    "Linux": (
        "create a v4l2loopback device first: sudo apt install v4l2loopback-dkms && "
        "sudo modprobe v4l2loopback exclusive_caps=1 card_label=livediff "
        "(then pass --vcam-device /dev/videoN if there are several)"
    ),
    "Windows": "install OBS Studio 26+ and start its virtual camera once (or install Unity Capture)",
    "Darwin": "install OBS Studio 30+ and start its virtual camera once, so the system extension is installed",
}


class Y4MFileBackend:
    """A pyvirtualcam backend writing RGB frames to ``device`` (a ``.y4m`` path), yuv420p."""

    def __init__(
        self, *, width: int, height: int, fps: float, fourcc: int, device: str | None, **kw: Any
    ) -> None:
        import pyvirtualcam.util
        from pyvirtualcam import PixelFormat

        if fourcc != pyvirtualcam.util.encode_fourcc(PixelFormat.RGB.value):
            raise ParameterError("the y4m backend takes RGB frames only", field="fourcc")
        if not device:
            raise ParameterError(
                "the y4m backend needs device=<path of the .y4m file to write>", field="device"
            )
        if width % 2 or height % 2:
            raise ParameterError(
                f"the y4m backend needs even sizes (yuv420p), not {width}x{height}", field="width"
            )
        self._path, self._width, self._height = device, width, height
        self._container = av.open(device, "w", format="yuv4mpegpipe")
        self._stream = self._container.add_stream(
            "rawvideo", rate=Fraction(fps).limit_denominator(1001)
        )
        self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"

    def send(self, frame: np.ndarray) -> None:
        image = frame.reshape(self._height, self._width, 3)
        video = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
        self._container.mux(self._stream.encode(video))

    def close(self) -> None:
        self._container.mux(self._stream.encode(None))
        self._container.close()

    def device(self) -> str:
        return self._path

    def native_fourcc(self) -> int | None:
        return None


def register_y4m_backend() -> None:
    """Make ``backend="y4m"`` available to ``pyvirtualcam.Camera`` (idempotent)."""
    import pyvirtualcam

    pyvirtualcam.register_backend(Y4M_BACKEND, Y4MFileBackend)


class VirtualCamera(ClosesOnExit):
    """One open virtual camera; ``close()`` is idempotent, and it is a context manager."""

    def __init__(
        self,
        width: int,
        height: int,
        *,
        fps: float = 30.0,
        backend: str | None = None,
        device: str | None = None,
    ) -> None:
        try:
            import pyvirtualcam
        except ImportError:
            raise MediaError(
                "the virtual camera needs pyvirtualcam: pip install 'livediff[webrtc]'"
            ) from None
        if backend == Y4M_BACKEND:
            register_y4m_backend()
        elif backend is not None and backend not in pyvirtualcam.camera.BACKENDS:
            known = ", ".join([*pyvirtualcam.camera.BACKENDS, Y4M_BACKEND])
            raise MediaError(
                f"virtual camera backend {backend!r} is not available here; choose one of: {known}"
            )
        try:
            self._camera = pyvirtualcam.Camera(
                width, height, fps, fmt=pyvirtualcam.PixelFormat.RGB, backend=backend, device=device
            )
        except (RuntimeError, ValueError, OSError) as exc:
            help_text = SETUP_HELP.get(
                platform.system(), "install a virtual camera (OBS Studio or v4l2loopback)"
            )
            reason = " ".join(str(exc).split())
            raise MediaError(f"no virtual camera could be opened ({reason}); {help_text}") from exc
        self.width, self.height = width, height
        self.frames_sent = 0
        self._closed = False
        log.info(
            "virtual camera %s (%s) %dx%d @ %.3g fps", self.device, self.backend, width, height, fps
        )

    @property
    def device(self) -> str:
        return str(self._camera.device)

    @property
    def backend(self) -> str:
        return str(self._camera.backend)

    def send(self, image: np.ndarray, time: Any = None) -> None:
        """Send one uint8 ``[H, W, 3]`` RGB frame of the camera's size (blocking: call it off the
        event loop). A virtual camera has no timestamps: ``time`` is not used."""
        if image.shape != (self.height, self.width, 3):
            raise MediaError(
                f"virtual camera is {self.width}x{self.height}; got a frame of shape {image.shape}"
            )
        self._camera.send(np.ascontiguousarray(image))
        self.frames_sent += 1

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._camera.close()
