"""Helpers for the reliability tests: fault-injecting model bundles, resource counts, log checks.

Fault injection happens in the model bundle, where a real device fails: ``predict_noise`` is
the UNet call of every batch. There is no GPU here, so an out-of-memory batch is simulated by
raising the error CUDA raises (``torch.cuda.OutOfMemoryError``) or the generic
``RuntimeError("... out of memory ...")`` from the predictor, when a batch is larger than a
pretend memory cap.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import pytest
import torch

from livediff.models.bundle import ModelBundle
from livediff.models.unet_batch import UNetBatch

B = TypeVar("B", bound=ModelBundle)
TOKEN = "test-token-5f2c9a7e41d04b8b"  # at least 16 printable characters (ServerConfig's rule)


def derived(cls: type[B], bundle: ModelBundle, **extra: Any) -> B:
    """``bundle``'s parts in a subclass that changes ``predict_noise``."""
    return cls(**{f.name: getattr(bundle, f.name) for f in fields(ModelBundle)}, **extra)


@dataclass
class GatedBundle(ModelBundle):
    """Every UNet call waits for ``gate``; ``entered`` is set when one is waiting (a frame in flight)."""

    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)

    def predict_noise(self, batch: UNetBatch) -> torch.Tensor:
        self.entered.set()
        self.gate.wait()
        return super().predict_noise(batch)


@dataclass
class MemoryCappedBundle(ModelBundle):
    """A UNet call over more than ``max_rows`` rows raises ``error()`` (a device out of memory)."""

    max_rows: int = 1_000_000
    generic_error: bool = False  # RuntimeError("... out of memory ...") instead of CUDA's own
    calls: list[int] = field(default_factory=list)  # rows of every call, failed or not

    def predict_noise(self, batch: UNetBatch) -> torch.Tensor:
        rows = int(batch.latents.shape[0])
        self.calls.append(rows)
        if rows > self.max_rows:
            if self.generic_error:
                raise RuntimeError(f"[backend] out of memory: a batch of {rows} rows")
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().predict_noise(batch)


# ---------------------------------------------------------------- resources
def rss_mb() -> float:
    """This process's resident set size in MiB (``/proc/self/status``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass(frozen=True)
class Resources:
    tasks: int
    threads: int
    fds: int
    rss_mb: float
    thread_names: tuple[str, ...]

    @classmethod
    def now(cls) -> Resources:
        gc.collect()
        threads = threading.enumerate()
        return cls(
            tasks=len(asyncio.all_tasks()),
            threads=len(threads),
            fds=open_fds(),
            rss_mb=rss_mb(),
            thread_names=tuple(sorted(t.name for t in threads)),
        )


def live_instances(*types: type) -> dict[str, int]:
    """How many objects of each type the garbage collector can reach."""
    gc.collect()
    counts = {t.__name__: 0 for t in types}
    for obj in gc.get_objects():
        for kind in types:
            if type(obj) is kind:
                counts[kind.__name__] += 1
    return counts


# ---------------------------------------------------------------- logs
def problems(records: Iterable[logging.LogRecord], level: int = logging.WARNING) -> list[str]:
    """Log records at ``level`` or above, and any record carrying a traceback."""
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in records
        if r.levelno >= level or r.exc_info is not None
    ]


def all_log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every captured record, formatted with its arguments and traceback."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(record) for record in caplog.records)
