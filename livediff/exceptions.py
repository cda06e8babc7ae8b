"""Every exception livediff raises on purpose lives here.

This module is the bottom of the import graph: it imports nothing, and every layer may import
it (``kernels/`` included: ``livediff/__init__.py`` is lazy, so ``import livediff.exceptions``
loads this file and nothing else). Product code raises only these classes, never a bare
``ValueError``, ``TypeError`` or ``RuntimeError`` (``tests/test_boundaries.py`` checks it).

The hierarchy is shallow so callers can catch at the level they care about. Where callers
already catch a built-in, the class subclasses it (``except ValueError`` still works):

- :class:`LivediffError` — base of everything below; the CLI prints its message and exits 2.
- :class:`InvalidFrameError` (a ``ValueError``) — a frame that cannot be processed; one subclass
  per reason: :class:`FrameDtypeError`, :class:`FrameShapeError` (and
  :class:`FrameTooLargeError`), :class:`EmptyFrameError`, :class:`NonFiniteFrameError`.
- :class:`ParameterError` (a ``ValueError``) — a configuration or live-update value out of range.
- :class:`KernelInputError` (a ``ValueError``) — a tensor handed to a ``livediff::`` kernel op
  with the wrong shape, dtype or device.
- :class:`ProtocolError` (a ``ValueError``) — a client request or message that breaks the wire
  protocol.
  - :class:`OfferError` — a ``POST /offer`` that cannot be answered as sent (HTTP 400).
- :class:`RecordError` (a ``ValueError``) — a benchmark record that lacks what is needed.
- :class:`UsageError` (a ``RuntimeError``) — an API called against its contract: from a second
  event loop, twice where once is the rule, while another holder is active.
- :class:`ModelLoadError` — a model that could not be built or loaded, or does not behave as
  its family must.
  - :class:`ModelNotAvailableError` — pretrained weights are not cached and cannot be downloaded.
- :class:`BackendError` — an accelerated backend (compile, TensorRT) that cannot start.
- :class:`SessionError` — a streaming session that was refused or has failed.
  - :class:`CapacityError` — the engine refuses a new session because it is overloaded.
  - :class:`SessionClosedError` — an operation on a session that has already ended.
- :class:`ConflictError` — a request the server's current state refuses: a name already in
  use, a LoRA that sessions still use, a full LoRA store (HTTP 409).
- :class:`NotFoundError` — a request naming something the server does not hold (HTTP 404).
- :class:`BatchCompositionError` — sessions packed into one call that cannot share it (a bug).
- :class:`MediaError` — an input or output file that PyAV cannot open, decode or encode.

Messages are written for the person at the other end: they say what was wrong, what was
expected, and where useful what to do about it. The data a client needs rides along as
attributes, not only in the text: every error may carry ``field`` (the setting, message key or
argument to blame, for clients that point at it) and ``limit`` (the bound that was exceeded:
bytes, pixels, levels, sessions); :class:`CapacityError` carries ``retry_after`` (seconds, for
``Retry-After``).
"""

from __future__ import annotations


class LivediffError(Exception):
    """Base class of all errors raised on purpose by livediff.

    ``field`` names what to blame; ``limit`` is the bound that was exceeded, when one was.
    """

    def __init__(
        self, message: str = "", *, field: str | None = None, limit: int | float | None = None
    ) -> None:
        super().__init__(message)
        self.field = field
        self.limit = limit


class InvalidFrameError(LivediffError, ValueError):
    """A frame that cannot be processed: wrong dtype, shape, channel count, empty or non-finite."""


class FrameDtypeError(InvalidFrameError):
    """The frame's element type is not uint8 (or a float type in [0, 1])."""


class FrameShapeError(InvalidFrameError):
    """The frame is not H×W×3 (wrong channel count, wrong rank, or too large)."""


class FrameTooLargeError(FrameShapeError):
    """The frame has more pixels, or a longer side, than ``limit`` allows."""


class EmptyFrameError(InvalidFrameError):
    """The frame has no pixels."""


class NonFiniteFrameError(InvalidFrameError):
    """A float frame holds NaN or infinite values."""


class ParameterError(LivediffError, ValueError):
    """A configuration or live-update value that is out of range or of the wrong type."""


class KernelInputError(LivediffError, ValueError):
    """A tensor handed to a ``livediff::`` kernel op has the wrong shape, dtype or device.

    ``field`` names the argument (``"x_t"``, ``"crop"`` …). The engine never sends one; a caller
    of :mod:`livediff.kernels` that does gets this before any kernel runs.
    """


class ProtocolError(LivediffError, ValueError):
    """A client request or message that breaks the wire protocol (shape, size, encoding)."""


class OfferError(ProtocolError):
    """A ``POST /offer`` that cannot be served as sent (answered with 400)."""


class RecordError(LivediffError, ValueError):
    """A benchmark record (one JSON line) lacks the keys a writer or a plot needs."""


class UsageError(LivediffError, RuntimeError):
    """An API called against its documented contract (wrong event loop, read twice, stacked)."""


class ModelLoadError(LivediffError):
    """A model could not be built or loaded, or does not behave as its family must."""


class ModelNotAvailableError(ModelLoadError):
    """Pretrained weights are not in the local cache and cannot be downloaded."""


class BackendError(LivediffError):
    """An accelerated backend could not start. Raised at start-up, never silently bypassed."""


class SessionError(LivediffError):
    """A streaming session was refused or failed."""


class CapacityError(SessionError):
    """The engine is at capacity (or degraded to its last level) and refuses new sessions.

    ``limit`` is the session limit that was reached, when that was the reason; ``retry_after``
    the seconds after which trying again may succeed, when the engine can tell.
    """

    def __init__(
        self,
        message: str = "",
        *,
        field: str | None = None,
        limit: int | float | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, field=field, limit=limit)
        self.retry_after = retry_after


class SessionClosedError(SessionError):
    """The session has ended; no more frames or updates are accepted."""


class ConflictError(LivediffError):
    """A request that the server's current state refuses (a name in use, a LoRA in use, a full
    store); trying again after the conflict is resolved may succeed."""


class NotFoundError(LivediffError):
    """A request named something the server does not hold (an unknown LoRA)."""


class BatchCompositionError(LivediffError, RuntimeError):
    """Sessions were put into one model call that cannot share it (a grouping rule was broken)."""


class MediaError(LivediffError):
    """An input or output media file could not be opened, decoded or encoded."""
