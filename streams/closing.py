"""One way for the media edges (files, cameras) to be used in ``with`` blocks."""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

_C = TypeVar("_C", bound="ClosesOnExit")


class ClosesOnExit:
    """``with x:`` closes ``x`` on the way out; subclasses define an idempotent :meth:`close`
    (and may refine ``__exit__``, as the file sink does to keep the error that stopped it)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
