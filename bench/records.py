"""Benchmark records: one JSON object per line, with where, when and how it was measured.

Every record carries at least: system, suite, model, weights, width, height, steps, mode,
rcfg, sessions, fps, ms_median, ms_p99, device, torch, commit, date, command. Timings are
summarised by :func:`summarize` (median and p99 of per-frame milliseconds).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from livediff.exceptions import RecordError

REQUIRED_KEYS = (
    "system",
    "suite",
    "model",
    "weights",
    "width",
    "height",
    "steps",
    "mode",
    "rcfg",
    "sessions",
    "fps",
    "ms_median",
    "ms_p99",
    "device",
    "torch",
    "commit",
    "date",
    "command",
)


def git_commit() -> str:
    """The checkout's short commit; ``LIVEDIFF_COMMIT`` wins (a copied tree may have no .git)."""
    if os.environ.get("LIVEDIFF_COMMIT"):
        return os.environ["LIVEDIFF_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device | str | None = None) -> dict[str, Any]:
    """Device name, torch version, commit, UTC date and the command line."""
    target = torch.device(device) if device is not None else None
    if target is not None and target.type == "cuda":
        name = torch.cuda.get_device_name(target)
    else:
        name = "cpu"
    return {
        "device": name,
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
    }


def int_list(text: str) -> list[int]:
    """``"1,2,4"`` → ``[1, 2, 4]`` (argparse ``type`` for options such as ``--buckets``)."""
    return [int(value) for value in text.split(",") if value.strip()]


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse ``type`` for a comma-separated list of some of ``choices`` (``--systems``)."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names or any(n not in choices for n in names):
            raise argparse.ArgumentTypeError(f"{text!r}: expected some of {', '.join(choices)}")
        return names

    return parse


def percentile(values: Sequence[float], q: float) -> float:
    return (
        float(np.percentile(np.asarray(values, dtype=np.float64), q))
        if len(values)
        else float("nan")
    )


def summarize(ms_per_frame: Sequence[float]) -> dict[str, float]:
    median = percentile(ms_per_frame, 50)
    return {
        "ms_median": round(median, 4),
        "ms_p99": round(percentile(ms_per_frame, 99), 4),
        "fps": round(1000.0 / median, 2) if median > 0 else float("nan"),
        "frames": len(ms_per_frame),
    }


def emit(record: dict[str, Any], outputs: Iterable[TextIO] = (sys.stdout,)) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise RecordError(f"benchmark record lacks {missing}", field=missing[0])
    line = json.dumps(record, sort_keys=False)
    for out in outputs:
        print(line, file=out, flush=True)


@contextlib.contextmanager
def record_sinks(path: Path | None) -> Iterator[list[TextIO]]:
    """Where records go: stdout, and ``path`` opened for appending (folder made) when given."""
    sinks: list[TextIO] = [sys.stdout]
    with contextlib.ExitStack() as stack:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            sinks.append(stack.enter_context(path.open("a")))
        yield sinks


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reset_memory(device: torch.device) -> None:
    """Free what the last case left and start the device's peak-memory count anew."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gpu_memory_peak_mb(device: torch.device | str) -> float | None:
    target = torch.device(device)
    if target.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(target) / 2**20, 1)
