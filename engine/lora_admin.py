"""Loading and unloading per-session LoRAs while sessions stream (``Engine.load_lora`` …).

A load reads and checks the file in a thread of its own (the slow part: disk or the HF cache,
safetensors, shape checks), then only the buffer write runs on each device's worker, between
two batches (:meth:`Worker.between_batches`), so no session waits more than that write.
An unload is refused while any open (or opening) session uses the LoRA: its rows point at the
LoRA's slot, and a later load into the freed slot would switch those sessions to another style
silently. The name is retired before that check, so no session can take it while the workers
unload it (it is refused: "being unloaded").

Refusals (all from :mod:`livediff.exceptions`, each with ``field``):

- no library on this server, a name in use, a LoRA still used, a full store: ``ConflictError``;
- an unknown name on unload: ``NotFoundError``;
- a bad name: ``ParameterError``; a file the loader refuses: ``ModelLoadError`` (its message,
  ``field="source"``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future
from functools import partial
from typing import Any

from livediff.exceptions import ConflictError, ModelLoadError, NotFoundError, ParameterError
from livediff.models.lora_library import LoraLibrary
from livediff.models.lora_store import LoadedLora

log = logging.getLogger(__name__)

MAX_NAME_LENGTH = 64
NO_LIBRARY = (
    "this server has no per-session LoRA library: start it with --lora-library DIR_OR_TOML "
    "([lora_library] library)"
)

# Runs a job on one device's worker between batches (Worker.between_batches).
OnWorker = Callable[[Callable[[], Any]], Future[Any]]


def check_name(name: Any) -> str:
    """A LoRA name sessions can write as ``NAME[:SCALE]`` in a comma-separated list."""
    if (
        not isinstance(name, str)
        or not name.strip()
        or name != name.strip()
        or len(name) > MAX_NAME_LENGTH
        or any(c in name for c in ":,/\\")
    ):
        raise ParameterError(
            f"name={name!r}: a LoRA name is a text of 1 to {MAX_NAME_LENGTH} characters without "
            "':', ',', slashes or surrounding spaces",
            field="name",
            limit=MAX_NAME_LENGTH,
        )
    return name


class LoraAdmin:
    """The per-session LoRA libraries of an engine's devices (one per device's UNet)."""

    def __init__(
        self,
        libraries: Sequence[LoraLibrary | None],
        on_workers: Sequence[OnWorker],
        uses: Callable[[], Mapping[str, Collection[str]]],
    ) -> None:
        """``uses()``: for every open session, the LoRA names it asks for or runs with."""
        present = [library for library in libraries if library is not None]
        if present and len(present) != len(libraries):
            raise ParameterError("either every device's model has a LoRA library or none has")
        self.libraries = tuple(present)
        self.on_workers = tuple(on_workers)
        self.uses = uses
        self._pending: set[str] = set()  # names being loaded now

    @property
    def enabled(self) -> bool:
        return bool(self.libraries)

    def users(self, name: str) -> list[str]:
        return sorted(sid for sid, names in self.uses().items() if name in names)

    def describe(self) -> dict[str, Any]:
        """What ``GET /loras`` answers: each loaded LoRA (with how many sessions use it), and
        the store's sizes (``capacity`` is ``None`` without a library)."""
        if not self.enabled:
            return {"loras": [], "capacity": None}
        library = self.libraries[0]
        store = library.store
        loaded = library.loaded()
        capacity = library.capacity
        return {
            "loras": [
                {**lora.describe(), "sessions": len(self.users(lora.name))} for lora in loaded
            ],
            "capacity": {
                "max_loras": capacity.max_loras,
                "max_rank": capacity.max_rank,
                "slots_per_row": capacity.slots_per_row,
                "free_slots": capacity.max_loras - len(loaded),
                "slot_bytes": store.slot_bytes,
                "reserved_bytes": store.total_bytes,
            },
            "merge": self._merge_state(library, loaded),
        }

    @staticmethod
    def _merge_state(library: LoraLibrary, loaded: Sequence[LoadedLora]) -> dict[str, Any]:
        """What the first device's weights hold (:mod:`livediff.models.lora_merge`)."""
        merge = library.merge
        names = {lora.slot: lora.name for lora in loaded}
        return {
            "enabled": merge.config.enabled,
            "merged": [{"name": names.get(slot), "scale": scale} for slot, scale in merge.merged],
            "base_copy_bytes": merge.base_bytes,
            "refused": merge.refusal() or None,
        }

    async def load(self, name: str, source: str, weight_name: str | None = None) -> LoadedLora:
        """Read ``source`` off the event loop, then write it into a free slot on every device."""
        library = self._library()
        name = check_name(name)
        if not isinstance(source, str) or not source.strip():
            raise ParameterError("source: a file, folder or HF id of a LoRA", field="source")
        if weight_name is not None and not isinstance(weight_name, str):
            raise ParameterError(
                "weight_name: a file name in the folder or repo", field="weight_name"
            )
        if name in library.names() or name in self._pending:
            raise ConflictError(
                f"a LoRA named {name!r} is loaded already: unload it first", field="name"
            )
        taken = len(library.loaded()) + len(self._pending)
        if taken >= library.capacity.max_loras:
            raise ConflictError(
                f"all {library.capacity.max_loras} LoRA slots are in use: unload one first "
                "(DELETE /loras/NAME), or start the server with more --lora-slots",
                field="name",
                limit=library.capacity.max_loras,
            )
        self._pending.add(name)
        try:
            return await self._load(library, name, source, weight_name)
        except ModelLoadError as exc:  # what the loader refuses is the source's fault
            raise ModelLoadError(str(exc), field="source", limit=exc.limit) from exc
        finally:
            self._pending.discard(name)

    async def _load(
        self, library: LoraLibrary, name: str, source: str, weight_name: str | None
    ) -> LoadedLora:
        lora = await asyncio.to_thread(library.read, name, source, weight_name=weight_name)
        # Laid out and page-locked off the worker too: between two batches the worker only
        # queues one copy per buffer (a stall of its own frames otherwise, bench --suite lora).
        staged = await asyncio.to_thread(library.stage, lora)
        entries: list[LoadedLora] = []
        try:
            for device_library, on_worker in zip(self.libraries, self.on_workers, strict=True):
                entries.append(
                    await asyncio.wrap_future(on_worker(partial(device_library.add, lora, staged)))
                )
        except BaseException:
            for device_library, on_worker in zip(self.libraries, self.on_workers, strict=True):
                if name in device_library.names():
                    await asyncio.wrap_future(on_worker(partial(device_library.unload, name)))
            raise
        return entries[0]

    async def unload(self, name: str) -> LoadedLora:
        """Free ``name``'s slot on every device; refused while a session uses it."""
        library = self._library()
        if name not in library.names():
            known = ", ".join(library.names()) or "none"
            raise NotFoundError(f"no LoRA named {name!r} is loaded; loaded: {known}", field="name")
        # Retired first, checked second: a session asking for it from now on is refused, and
        # one that asked before (or is opening with it) counts as a user, so no row can take
        # the slot between this check and the workers' unload.
        for device_library in self.libraries:
            device_library.store.retire(name)
        users = self.users(name)
        if users:
            for device_library in self.libraries:
                device_library.store.keep(name)
            raise ConflictError(
                f"LoRA {name!r} is used by {len(users)} session(s): they must drop it "
                "(update loras) or close before it can be unloaded",
                field="name",
                limit=len(users),
            )
        try:
            entries = [
                await asyncio.wrap_future(on_worker(partial(device_library.unload, name)))
                for device_library, on_worker in zip(self.libraries, self.on_workers, strict=True)
            ]
        finally:
            for device_library in self.libraries:  # a device whose unload failed keeps it usable
                device_library.store.keep(name)
        return entries[0]

    def _library(self) -> LoraLibrary:
        if not self.libraries:
            raise ConflictError(NO_LIBRARY, field="library")
        return self.libraries[0]
