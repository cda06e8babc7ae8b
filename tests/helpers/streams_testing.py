"""Helpers for the server-edge tests: tests/streams and tests/browser (``helpers.streams_testing``).

The tiny model with random weights answers almost every input with the same near-black
picture, which would make "this output came from that session" untestable. :func:`make_visible`
rescales the tiny VAE decoder's last layer so outputs span the visible range; then the seed
(the Stream Batch noise) changes the output by ~30 grey levels, far above codec loss (~8).
Sessions in these tests therefore differ in prompt *and* seed, and every received frame is
checked against the output the model makes for its own session (:func:`reference_output`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch
from aiohttp import web

from livediff.bench.netns import in_loopback_netns, loopback_netns_argv, netns_tools_missing
from livediff.engine.config import GenerationParams
from livediff.engine.degrade import DegradePolicy
from livediff.engine.runtime import Engine, RuntimeConfig
from livediff.engine.stream import Stream
from livediff.models.bundle import ModelBundle
from livediff.models.export import export_model
from livediff.models.loading import ModelSpec, load_model
from livediff.streams.app import create_app
from livediff.streams.server_config import ServerConfig
from livediff.streams.slow_clients import start_runner

# Slow CPUs must not trigger deadline drops or load shedding: the tests check content, not speed.
# Two prompts whose outputs differ clearly: tests tell sessions apart by them.
FOX = {"prompt": "a red fox", "seed": 11}
WHALE = {"prompt": "a blue whale", "seed": 22}
TEST_RUNTIME = RuntimeConfig(deadline_ms=600_000, degrade=DegradePolicy(enabled=False))
REPO = Path(__file__).resolve().parents[2]


def make_visible(bundle_vae: Any) -> None:
    """Scale the tiny TAESD decoder's output layer so images are mid-grey ± 40 levels, not black."""
    with torch.no_grad():
        last = bundle_vae.decoder.layers[-1]
        last.weight.mul_(8.0)
        last.bias.fill_(0.5)


def visible_tiny_bundle() -> ModelBundle:
    bundle = load_model(ModelSpec(preset="tiny", weights="random"), device="cpu", dtype="fp32")
    make_visible(bundle.vae)
    return bundle


def export_visible_tiny(folder: Path) -> Path:
    """A diffusers folder of the visible tiny model, for ``livediff serve --model tiny --source``."""
    from diffusers import AutoencoderTiny

    export_model(ModelSpec(preset="tiny", weights="random"), folder)
    vae = AutoencoderTiny.from_pretrained(folder / "vae_tiny")
    make_visible(vae)
    vae.save_pretrained(folder / "vae_tiny", safe_serialization=True)
    return folder


def pattern(width: int, height: int, seed: int) -> np.ndarray:
    """A test picture: a background colour and a few coloured squares."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = rng.integers(0, 256, 3)
    side = min(width, height) // 4
    for _ in range(6):
        x, y = rng.integers(0, width - side), rng.integers(0, height - side)
        image[y : y + side, x : x + side] = rng.integers(0, 256, 3)
    return image


def reference_output(bundle: ModelBundle, image: np.ndarray, **params: Any) -> np.ndarray:
    """What a one-step session with ``params`` (over the preset's defaults) makes of ``image``."""
    base = GenerationParams.for_preset(bundle.preset)
    stream = Stream(bundle, params=base.updated(**params))
    (output,) = stream.process(image)
    return output.numpy().astype(np.float32)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference in grey levels."""
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def closest(image: np.ndarray, references: dict[str, np.ndarray]) -> str:
    return min(references, key=lambda name: distance(image, references[name]))


def write_y4m(path: Path, frames: list[np.ndarray], fps: int = 30) -> Path:
    """A yuv420p Y4M clip (Chromium's fake-camera format)."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", format="yuv4mpegpipe") as container:
        stream = container.add_stream("rawvideo", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for image in frames:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def read_video(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@contextlib.asynccontextmanager
async def running_server(
    bundle: ModelBundle,
    config: ServerConfig | None = None,
    runtime: RuntimeConfig = TEST_RUNTIME,
    *,
    ndi_out: str | None = None,
) -> AsyncIterator[tuple[str, web.Application, Engine]]:
    """An engine and the app on ``127.0.0.1:<free port>``; yields (base URL, app, engine)."""
    engine = Engine(bundle, None, runtime, None)
    await engine.start()
    config = config or ServerConfig()
    app = create_app(engine, config, ndi_out=ndi_out)
    runner = await start_runner(app, config, access_log=None)
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}", app, engine
    finally:
        await runner.cleanup()
        await engine.stop()


# ---------------------------------------------------------------- loopback network namespace
NEEDS_NETNS = pytest.mark.skipif(
    not in_loopback_netns(),
    reason="WebRTC: runs inside a loopback-only network namespace (see test_in_loopback_netns)",
)


# What each module's inner run reported, for the summary (:func:`report_netns_runs`).
NETNS_RUNS = pytest.StashKey[list["NetnsRun"]]()
NETNS_CATEGORY = "passed in netns"  # the summary line's word for them


@dataclasses.dataclass
class NetnsRun:
    """One inner pytest run: each test's outcome (from ``-rA``) and the final counts."""

    outcomes: dict[str, str]
    counts: dict[str, int]


def parse_inner_run(stdout: str) -> NetnsRun:
    """Read an inner ``pytest -q -rA`` run's output: ``PASSED nodeid`` lines and the last line."""
    outcomes: dict[str, str] = {}
    for line in stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word in ("PASSED", "FAILED", "ERROR", "XFAIL", "XPASS") and "::" in rest:
            outcomes[rest.split(" - ")[0]] = word.lower()
    last = next((line for line in reversed(stdout.splitlines()) if line.strip()), "")
    counts = {
        ("errors" if word.startswith("error") else word): int(n)
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", last)
    }
    return NetnsRun(outcomes, counts)


def report_netns_runs(reporter: pytest.TerminalReporter) -> None:
    """Tell the truth about the tests skipped here because they run inside the namespace.

    Their module's ``test_in_loopback_netns`` ran them in a child pytest; those that passed
    there move from "skipped" to their own word in the final line, and one line says so.
    Called from ``pytest_terminal_summary`` in tests/conftest.py, before the final line.
    """
    runs = reporter.config.stash.get(NETNS_RUNS, [])
    if not runs:
        return
    passed_inside = {
        nodeid for run in runs for nodeid, outcome in run.outcomes.items() if outcome == "passed"
    }
    skipped = reporter.stats.get("skipped", [])
    moved = [r for r in skipped if r.nodeid in passed_inside]
    if moved:
        moved_ids = {id(r) for r in moved}
        reporter.stats["skipped"] = [r for r in skipped if id(r) not in moved_ids]
        if not reporter.stats["skipped"]:
            del reporter.stats["skipped"]
        reporter.stats.setdefault(NETNS_CATEGORY, []).extend(moved)
    totals: collections.Counter[str] = collections.Counter()
    for run in runs:
        totals.update(run.counts)
    inside = ", ".join(f"{n} {word}" for word, n in totals.items()) or "no summary line"
    line = (
        f"{len(runs)} test_in_loopback_netns run(s) ran their modules' WebRTC tests inside a "
        f"loopback-only network namespace: {inside}."
    )
    if moved:
        line += (
            f" {len(moved)} tests skipped in this process passed there: the final line counts"
            f" them as {NETNS_CATEGORY!r}, not as skipped."
        )
    reporter.write_sep("-", "loopback network namespace")
    reporter.write_line(line)


def netns_module_runner(module_file: str, *, timeout_s: int = 900) -> Callable[..., None]:
    """A test that runs ``module_file`` under pytest inside ``unshare --net`` and passes if it passes.

    The module's other tests carry :data:`NEEDS_NETNS`, so this process skips them; the inner
    run's results are kept for the summary (:func:`report_netns_runs`).
    """

    @pytest.mark.skipif(in_loopback_netns(), reason="already inside the loopback network namespace")
    @pytest.mark.timeout(timeout_s)
    def test_in_loopback_netns(request: pytest.FixtureRequest) -> None:
        missing = netns_tools_missing()
        if missing:
            pytest.skip(
                f"needs {' and '.join(missing)} (util-linux, iproute2) to make a loopback-only network namespace"
            )
        argv = loopback_netns_argv(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-rA",
                "-k",
                "not test_in_loopback_netns",
                module_file,
            ]
        )
        result = subprocess.run(
            argv,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout_s - 30,
            # The inner run reads its own summary: the outer run's PYTEST_ADDOPTS (CI's -q)
            # would change it.
            env={
                **{k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"},
                "PYTHONUNBUFFERED": "1",
            },
        )
        request.config.stash.setdefault(NETNS_RUNS, []).append(parse_inner_run(result.stdout))
        output = result.stdout[-12000:] + result.stderr[-4000:]
        assert result.returncode == 0, (
            f"tests inside the loopback netns failed (exit {result.returncode}):\n{output}"
        )
        assert " passed" in result.stdout and " skipped" not in result.stdout.splitlines()[-1], (
            output
        )

    return test_in_loopback_netns
