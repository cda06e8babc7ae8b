"""What the media edges need from the engine: :class:`EngineLike` and :class:`SessionLike`.

``streams/`` talks to the engine through these two protocols and nothing wider.
:class:`livediff.engine.runtime.Engine` and :class:`livediff.engine.session.Session` satisfy
them structurally: ``tests/streams/test_engine_protocol.py`` checks every member and
signature against a running engine, and :func:`_engine_conforms` lets a type checker that sees
the installed layout check it too. A test can hand the app any object with the same methods.
Starting and stopping the engine is its owner's business (``livediff serve``), not the app's,
so neither is here.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import prometheus_client
    import torch

    from livediff.engine.config import GenerationParams, StreamConfig
    from livediff.engine.frames import OutputFormat, YuvFrame
    from livediff.engine.runtime import Engine, EngineState
    from livediff.engine.session import DroppedFrame, Session, SessionOutput


@runtime_checkable
class SessionLike(Protocol):
    """One engine session as a transport uses it (see ``livediff.engine.session.Session``)."""

    @property
    def id(self) -> str: ...

    @property
    def params(self) -> GenerationParams: ...

    @property
    def config(self) -> StreamConfig: ...

    @property
    def pin_inputs(self) -> bool: ...

    def submit(
        self,
        image: np.ndarray | torch.Tensor | YuvFrame,
        *,
        pts: int | None = None,
        time_base: Fraction | None = None,
        owned: bool = False,
    ) -> None: ...

    def report_drops(self, limit: int = 4096) -> None: ...

    async def recv(self) -> SessionOutput: ...

    async def next_event(self) -> SessionOutput | DroppedFrame: ...

    async def update(self, **changes: Any) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...

    def end(self, reason: str) -> None: ...


@runtime_checkable
class EngineLike(Protocol):
    """The engine as the app uses it (see ``livediff.engine.runtime.Engine``)."""

    @property
    def state(self) -> EngineState: ...

    @property
    def registry(self) -> prometheus_client.CollectorRegistry: ...

    async def open_session(
        self, params: Mapping[str, Any] | None = None, *, output: OutputFormat = ...
    ) -> SessionLike: ...

    async def wait_idle(self) -> None: ...

    def health(self) -> dict[str, Any]: ...

    def metrics(self) -> dict[str, Any]: ...

    def control_options(self) -> list[dict[str, Any]]: ...
    def encode_style_image(self, image_file: bytes) -> str: ...

    async def set_control_image(
        self, session_id: str, controlnet: str, image: bytes | np.ndarray
    ) -> list[str]: ...

    def awaiting_control_images(self, session_id: str) -> list[str]: ...

    async def control_previews(self, session_id: str) -> dict[str, np.ndarray]: ...

    def loras(self) -> dict[str, Any]: ...

    async def load_lora(
        self, name: str, source: str, *, weight_name: str | None = None
    ) -> dict[str, Any]: ...

    async def unload_lora(self, name: str) -> dict[str, Any]: ...

    def feature_bank_frames(self) -> int: ...


if TYPE_CHECKING:

    def _engine_conforms(engine: Engine, session: Session) -> tuple[EngineLike, SessionLike]:
        """Never called: mypy fails here when the engine drifts from what the edges use."""
        return engine, session
