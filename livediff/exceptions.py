"""Every exception livediff raises on purpose lives here.

The hierarchy is shallow so callers can catch at the level they care about:

- :class:`LivediffError` — base of everything below; the CLI prints its message and exits 2.
- :class:`InvalidFrameError` — a frame that cannot be processed; one subclass per reason:
  :class:`FrameDtypeError`, :class:`FrameShapeError`, :class:`EmptyFrameError`,
  :class:`NonFiniteFrameError`.
- :class:`ParameterError` — a configuration or live-update value out of range.
- :class:`ProtocolError` — a client request or message that breaks the wire protocol.
  - :class:`OfferError` — a ``POST /offer`` that cannot be answered as sent (HTTP 400).
- :class:`ModelLoadError` — a model that could not be built or loaded.
  - :class:`ModelNotAvailableError` — pretrained weights are not cached and cannot be downloaded.
- :class:`BackendError` — an accelerated backend (compile, TensorRT) that cannot start.
- :class:`SessionError` — a streaming session that was refused or has failed.
  - :class:`CapacityError` — the engine refuses a new session because it is overloaded.
  - :class:`SessionClosedError` — an operation on a session that has already ended.
- :class:`BatchCompositionError` — sessions packed into one call that cannot share it (a bug).
- :class:`MediaError` — an input or output file that PyAV cannot open, decode or encode.

Messages are written for the person at the other end: they say what was wrong, what was
expected, and where useful what to do about it. Every error may carry ``field`` (the setting
or message key to blame, for clients that point at it); :class:`CapacityError` carries
``retry_after`` (seconds, for ``Retry-After``).
"""

from __future__ import annotations


class LivediffError(Exception):
    """Base class of all errors raised on purpose by livediff; ``field`` names what to blame."""

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class InvalidFrameError(LivediffError, ValueError):
    """A frame that cannot be processed: wrong dtype, shape, channel count, empty or non-finite."""


class FrameDtypeError(InvalidFrameError):
    """The frame's element type is not uint8 (or a float type in [0, 1])."""


class FrameShapeError(InvalidFrameError):
    """The frame is not H×W×3 (wrong channel count, wrong rank, or too large)."""


class EmptyFrameError(InvalidFrameError):
    """The frame has no pixels."""


class NonFiniteFrameError(InvalidFrameError):
    """A float frame holds NaN or infinite values."""


class ParameterError(LivediffError, ValueError):
    """A configuration or live-update value that is out of range or of the wrong type."""


class ProtocolError(LivediffError, ValueError):
    """A client request or message that breaks the wire protocol (shape, size, encoding)."""


class OfferError(ProtocolError):
    """A ``POST /offer`` that cannot be served as sent (answered with 400)."""


class ModelLoadError(LivediffError):
    """A model could not be built or loaded."""


class ModelNotAvailableError(ModelLoadError):
    """Pretrained weights are not in the local cache and cannot be downloaded."""


class BackendError(LivediffError):
    """An accelerated backend could not start. Raised at start-up, never silently bypassed."""


class SessionError(LivediffError):
    """A streaming session was refused or failed."""


class CapacityError(SessionError):
    """The engine is at capacity (or degraded to its last level) and refuses new sessions."""

    def __init__(
        self, message: str = "", *, field: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class SessionClosedError(SessionError):
    """The session has ended; no more frames or updates are accepted."""


class BatchCompositionError(LivediffError, RuntimeError):
    """Sessions were put into one model call that cannot share it (a grouping rule was broken)."""


class MediaError(LivediffError):
    """An input or output media file could not be opened, decoded or encoded."""
