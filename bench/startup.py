"""The ``startup`` suite: how long ``livediff serve`` takes from process start to a first frame.

For each compile-cache state it starts a real ``livediff serve`` process, connects a websocket
client as soon as the server listens, sends one frame and waits for the answer:

- ``cold``: empty Inductor cache, no compile package (a fresh machine, first start);
- ``warm``: Inductor's on-disk cache from the cold start kept, packages off (the same machine,
  second start);
- ``packaged``: an empty Inductor cache again, but the compile package the cold start wrote
  (a fresh machine that was handed ``~/.cache/livediff/compile``, or ran ``livediff compile``).

Records: ``suite: "startup"``, ``cache``, ``listening_s`` (process start to "listening on"),
``first_frame_s`` (process start to the first processed frame of a session); the server's own
account of its start, from its stderr: ``before_load_s`` (the interpreter, imports and settings,
until loading began), ``load_s``, ``prepare_s`` (compile + capture; ``None`` when nothing
compiles), ``engine_start_s``, ``compile`` (what the compile cache did: packaged or compiled,
how many of Inductor's graphs were read from a cache); ``other_s`` (listening − those four: the
server's own start, the bench's process spawn); ``backend``, ``buckets``, ``compile_batch``
(the server's ``--compile-batch``), plus the usual fields (``ms_median`` is ``first_frame_s``
in ms; one sample). ``--logs DIR`` keeps each server's stderr;
``--keep DIR`` keeps the caches and the package, so that ``--caches cold`` and then
``--caches packaged`` can be separate runs (each packaged start gets an emptied Inductor cache).
On a CPU machine (eager) nothing is compiled, so the three states measure the same start.

    python -m livediff.bench.startup --model sd-turbo --buckets 1,2 --out startup.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from livediff.bench.records import emit, environment, record_sinks
from livediff.exceptions import LivediffError

CACHES = ("cold", "warm", "packaged")
# livediff serve's lines about its start (cmd_serve: _say_where_the_start_went, serve)
START_LINE = re.compile(
    r"(?:loading began (?P<before>[\d.]+) s after the process started; )?"
    r"model loaded in (?P<load>[\d.]+) s"
    r"(?:; compile \+ capture (?P<prepare>[\d.]+) s \((?P<compile>.*)\))?$"
)
ENGINE_LINE = re.compile(r"engine started in (?P<engine>[\d.]+) s")
ACCOUNT = ("before_load_s", "load_s", "prepare_s", "engine_start_s", "compile")


def _number(text: str | None) -> float | None:
    return None if text is None else float(text)


def start_account(stderr: str) -> dict[str, Any]:
    """:data:`ACCOUNT`'s fields from a server's stderr (None where it did not say)."""
    account: dict[str, Any] = dict.fromkeys(ACCOUNT)
    for line in stderr.splitlines():
        start = START_LINE.search(line.strip())
        if start and account["load_s"] is None:  # the first device's line
            account["before_load_s"] = _number(start["before"])
            account["load_s"] = _number(start["load"])
            account["prepare_s"] = _number(start["prepare"])
            account["compile"] = start["compile"]
        engine = ENGINE_LINE.search(line)
        if engine:
            account["engine_start_s"] = float(engine["engine"])
    return account


async def first_frame(
    argv: list[str], env: dict[str, str], timeout_s: float, log: Path | None = None
) -> dict[str, Any]:
    """Start ``argv`` (a ``livediff serve`` with ``--port 0``), time it to its first answer, stop
    it; with the server's account of its start from its stderr (kept in ``log`` if given)."""
    import numpy as np
    from websockets.asyncio.client import connect

    from livediff.wire import encode_jpeg

    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    assert process.stdout is not None and process.stderr is not None
    stderr = asyncio.create_task(process.stderr.read())  # drained all along: a full pipe blocks
    try:
        line = await asyncio.wait_for(_listening_line(process.stdout), timeout_s)
        listening = time.perf_counter() - started
        url = line.rsplit(" ", 1)[1].strip().rstrip("/").replace("http://", "ws://") + "/ws"
        frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
        async with connect(url, max_size=None) as client:
            await client.recv()  # {"session": …}
            await client.send(encode_jpeg(frame))
            answer = await asyncio.wait_for(client.recv(), timeout_s)
        if not isinstance(answer, bytes):
            raise LivediffError(f"the server answered the first frame with {answer!r}")
        times = {
            "listening_s": round(listening, 2),
            "first_frame_s": round(time.perf_counter() - started, 2),
        }
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()
        text = (await stderr).decode(errors="replace")
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(text)
    account = start_account(text)
    parts = [account[name] for name in ACCOUNT[:-1]]
    rest = None if None in parts else round(times["listening_s"] - sum(parts), 2)
    return {**times, **account, "other_s": rest}


async def _listening_line(stdout: asyncio.StreamReader) -> str:
    while True:
        raw = await stdout.readline()
        if not raw:
            raise LivediffError("livediff serve ended before it listened")
        line = raw.decode()
        if "listening on" in line:
            return line


def run(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """One record per cache state, each as soon as it is measured."""
    with contextlib.ExitStack() as stack:
        if args.keep is None:
            root = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="livediff-startup-"))
            )
        else:
            root = args.keep
            root.mkdir(parents=True, exist_ok=True)
        config = root / "serve.toml"
        config.write_text(f"[runtime]\nbatch_buckets = [{args.buckets}]\n")
        packages = root / "packages"
        argv = [sys.executable, "-m", "livediff", "serve", "--model", args.model]
        argv += ["--weights", args.weights, "--port", "0", "--config", str(config)]
        if args.backend:
            argv += ["--backend", args.backend]
        argv += ["--compile-batch", args.compile_batch]

        def state(caches: str, package: str) -> dict[str, str]:
            return {  # Inductor's and Triton's on-disk caches, and where packages are kept
                "TORCHINDUCTOR_CACHE_DIR": str(root / f"inductor-{caches}"),
                "TRITON_CACHE_DIR": str(root / f"triton-{caches}"),
                "LIVEDIFF_COMPILE_CACHE": package,
            }

        states = {
            "cold": state("first", str(packages)),
            "warm": state("first", "off"),  # the first start's caches, no package
            "packaged": state("fresh", str(packages)),  # empty caches, the first start's package
        }
        for cache in args.caches:
            if cache == "packaged":
                if "cold" not in args.caches and not any(packages.glob("*.bin")):
                    raise LivediffError(
                        f"no compile package in {packages}: measure --caches cold first"
                        " (in this run, or in an earlier one with the same --keep)"
                    )
                for kind in ("inductor", "triton"):  # an empty cache, as on a fresh machine
                    shutil.rmtree(root / f"{kind}-fresh", ignore_errors=True)
            env = {**os.environ, **states[cache], "PYTHONUNBUFFERED": "1"}
            log = None if args.logs is None else args.logs / f"serve-{cache}.log"
            times = asyncio.run(first_frame(argv, env, args.timeout, log))
            yield (
                {
                    "system": "livediff",
                    "suite": "startup",
                    "cache": cache,
                    **times,
                    "backend": args.backend or "auto",
                    "buckets": args.buckets,
                    "compile_batch": args.compile_batch,
                    "model": args.model,
                    "weights": args.weights,
                    "width": None,
                    "height": None,
                    "steps": None,
                    "mode": "img2img",
                    "rcfg": "none",
                    "sessions": 1,
                    "fps": None,
                    "ms_median": times["first_frame_s"] * 1000.0,
                    "ms_p99": times["first_frame_s"] * 1000.0,
                    **environment(args.device),
                }
            )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="livediff bench --suite startup", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="sd-turbo")
    parser.add_argument("--weights", default="random")
    parser.add_argument("--backend", default=None, help="default: the device's (compile on CUDA)")
    parser.add_argument("--buckets", default="1,2,4,8,16,32", help="[runtime] batch_buckets")
    parser.add_argument(
        "--compile-batch",
        default="per-bucket",
        choices=("per-bucket", "shared"),
        help="the server's --compile-batch",
    )
    parser.add_argument("--caches", default=",".join(CACHES), help="which of cold,warm,packaged")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per start")
    parser.add_argument("--device", default=None, help="for the records' device field")
    parser.add_argument("--out", type=Path, help="append JSON lines to this file as well")
    parser.add_argument("--logs", type=Path, help="keep each server's stderr in this folder")
    parser.add_argument(
        "--keep",
        type=Path,
        help="keep the caches and packages in this folder (default: a temporary one), so that"
        " --caches cold and --caches packaged can run in separate invocations",
    )
    args = parser.parse_args(argv)
    args.caches = [c for c in args.caches.split(",") if c]
    unknown = sorted(set(args.caches) - set(CACHES))
    if unknown:
        parser.error(f"--caches: unknown {', '.join(unknown)}; choose from {', '.join(CACHES)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    with record_sinks(args.out) as outputs:
        for record in run(args):
            emit(record, outputs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
