"""Which device a new session goes to: the least-loaded one that is under its own cap.

Every device (one worker each) has a cap of ``max_sessions_per_device`` sessions
(``RuntimeConfig``; ``None``: only the engine-wide ``max_sessions`` applies). A new session
goes to the device with the fewest sessions among those under their cap, the first listed on
a tie; when every device is full, :meth:`Placement.acquire` answers ``None`` and the engine
refuses the session with ``CapacityError``. Devices whose worker is down for good or that
refuse sessions (degraded to their last level) are left out by the engine (``allowed``).
"""

from __future__ import annotations

from collections.abc import Sequence

from livediff.exceptions import ParameterError


class Placement:
    """Sessions per device; event loop only."""

    def __init__(self, devices: Sequence[str], cap: int | None) -> None:
        if not devices:
            raise ParameterError("a placement needs at least one device", field="devices")
        self.devices = tuple(devices)
        self.cap = cap
        self._loads = [0] * len(self.devices)
        self._where: dict[str, int] = {}

    def acquire(self, session_id: str, allowed: Sequence[int] | None = None) -> int | None:
        """Reserve a slot for ``session_id`` on one of the ``allowed`` devices (default: all);
        returns the device index, or ``None`` when they are all full."""
        candidates = range(len(self.devices)) if allowed is None else allowed
        open_ = [i for i in candidates if self.cap is None or self._loads[i] < self.cap]
        if not open_:
            return None
        index = min(open_, key=lambda i: (self._loads[i], i))
        self._loads[index] += 1
        self._where[session_id] = index
        return index

    def release(self, session_id: str) -> None:
        """Give the slot back; idempotent."""
        index = self._where.pop(session_id, None)
        if index is not None:
            self._loads[index] -= 1

    def loads(self) -> dict[str, int]:
        return dict(zip(self.devices, self._loads, strict=True))

    def full_message(self) -> str:
        return (
            f"every device is at its limit of {self.cap} sessions "
            f"([runtime] max_sessions_per_device; now {self.loads()}); try again when one closes"
        )
