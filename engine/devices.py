"""The devices one engine serves on: per device a model bundle, a worker and a control thread.

Every device runs its own worker thread (:mod:`livediff.engine.worker`: its own CUDA stream,
its own batch buffers and CUDA graphs, its own degrade level and fault budget) and its own
control thread (prompt encoding and Stream building for the sessions placed there, so that
building on one device never waits for another). A session lives on one device for its whole
life (:mod:`livediff.engine.placement` picks it); nothing it owns ever touches another device.

Threads rather than processes: the workers spend their time in CUDA calls and graph replays,
which release the GIL, and the host work per batch is small (see the multi-GPU results in
``bench/results/``); one process keeps one event loop, one metrics registry and one port.

Names: a device's label is its torch device (``cuda:0``); the same device listed twice (tests
run two workers on the CPU with ``cpu,cpu``) gets ``#k`` suffixes: ``cpu#0``, ``cpu#1``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from livediff.engine.worker import Worker, WorkerSnapshot
from livediff.exceptions import ParameterError
from livediff.models.bundle import ModelBundle


def device_labels(bundles: Sequence[ModelBundle]) -> list[str]:
    """One name per bundle: its device, with ``#k`` when the same device is listed twice."""
    names = [str(bundle.device) for bundle in bundles]
    return [f"{name}#{k}" if names.count(name) > 1 else name for k, name in enumerate(names)]


def resolve_devices(spec: Sequence[str], default: str) -> list[str]:
    """``--devices`` as torch device names: ``()`` → ``[default]``; ``("all",)`` → every CUDA device."""
    if not spec:
        return [default]
    if tuple(spec) == ("all",):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ParameterError("devices=all: no CUDA device is visible", field="devices")
        return [f"cuda:{index}" for index in range(count)]
    if "all" in spec:
        raise ParameterError("devices: 'all' stands alone, not in a list", field="devices")
    for name in spec:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ParameterError(
                f"devices: {name!r} is not a device name", field="devices"
            ) from None
        if device.type == "cuda" and device.index is not None:
            visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if device.index >= visible:
                raise ParameterError(
                    f"devices: {name} does not exist ({visible} CUDA devices visible)",
                    field="devices",
                )
    return list(spec)


@dataclass
class Device:
    """One device of the engine: its bundle, its worker, its control thread."""

    index: int
    label: str
    bundle: ModelBundle
    worker: Worker
    control: ThreadPoolExecutor

    def job(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn`` on this device's control thread; its device work is finished on return."""

        def run() -> Any:
            result = fn(*args)
            # The worker's CUDA stream must find this thread's work finished.
            if self.bundle.device.type == "cuda":
                torch.cuda.current_stream(self.bundle.device).synchronize()
            return result

        return self.control.submit(run)

    def snapshot(self) -> WorkerSnapshot:
        return self.worker.snapshot()
