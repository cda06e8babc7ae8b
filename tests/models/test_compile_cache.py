"""Compile packages: what a first start compiled, loaded by a fresh process instead of compiling.

Each run is a fresh Python process with its own empty Inductor cache folder, as on a fresh
machine; only the package file is shared. A tiny function compiled by Inductor on the CPU
stands in for the UNet (the mechanism is PyTorch's, the same on CUDA).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from livediff.models.bank_tokens import BankTokens
from livediff.models.bundle import ModelBundle
from livediff.models.compile_cache import artifact_key, cache_dir

REPO = Path(__file__).resolve().parents[2]
CHILD = r"""
import json, sys, torch
from torch._dynamo.utils import counters
from livediff.models.compile_cache import packaged_compile

def f(x):
    return torch.sin(x) * 2 + x.cos()

with packaged_compile("test-key") as report:
    torch.compile(f, fullgraph=True)(torch.ones(8))
print(json.dumps({
    "loaded": report.loaded,
    "written": report.written_bytes,
    "path": str(report.path),
    "hits": counters["inductor"]["fxgraph_cache_hit"],
    "misses": counters["inductor"]["fxgraph_cache_miss"],
    "caches": report.caches,
    "described": report.describe(),
}))
"""


def run_child(tmp_path: Path, packages: str, name: str) -> dict[str, object]:
    env = {
        **os.environ,
        "LIVEDIFF_COMPILE_CACHE": packages,
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}"),  # empty: a fresh machine
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_a_fresh_process_loads_the_package_and_compiles_from_it(tmp_path: Path) -> None:
    packages = tmp_path / "packages"
    first = run_child(tmp_path, str(packages), "first")
    assert (first["loaded"], first["hits"]) == (False, 0) and first["misses"] >= 1
    assert int(str(first["written"])) > 0 and Path(str(first["path"])).is_file()
    second = run_child(tmp_path, str(packages), "second")  # another empty Inductor cache
    assert second["loaded"] is True and second["written"] == 0
    assert int(str(second["hits"])) >= 1 and second["misses"] == 0  # code generation skipped
    caches = second["caches"]  # the report counts what the block did, as the server says it
    assert isinstance(caches, dict) and caches["inductor_hits"] >= 1
    assert caches["inductor_misses"] == 0 and first["caches"]["inductor_misses"] >= 1  # type: ignore[index]
    assert "Inductor cache: " in str(second["described"]) and "0 generated" in str(
        second["described"]
    )
    Path(str(first["path"])).write_bytes(b"not a package")  # a broken file: compile, replace it
    third = run_child(tmp_path, str(packages), "third")
    assert third["loaded"] is False and int(str(third["written"])) > 0
    off = run_child(tmp_path, "off", "off")
    assert off["path"] == "None" and off["written"] == 0


def test_the_key_names_what_the_compiled_code_depends_on(tiny_bundle: object) -> None:
    base = {"recipe": "r", "buckets": (1, 2), "latent_size": (16, 16)}
    key = artifact_key(tiny_bundle, **base)  # type: ignore[arg-type]
    assert key == artifact_key(tiny_bundle, **{**base, "buckets": (2, 1)})  # type: ignore[arg-type]
    for change in ({"buckets": (1, 2, 4)}, {"latent_size": (8, 8)}, {"recipe": "other"}):
        assert artifact_key(tiny_bundle, **{**base, **change}) != key  # type: ignore[arg-type]
    assert artifact_key(tiny_bundle, **base, weights_digest="abc") != key  # type: ignore[arg-type]


KEY_CHILD = r"""
from livediff.models.compile_cache import artifact_key
from livediff.models.loading import ModelSpec, load_model

bundle = load_model(ModelSpec(preset="tiny", weights="random"), device="cpu", dtype="fp32")
print(artifact_key(bundle, recipe="r", buckets=(1,), latent_size=(8, 8)))
"""


def test_the_key_is_the_same_in_every_process() -> None:
    """A fresh process must find the package an earlier one wrote: the key may not depend on
    the process's string hashing (diffusers configs hold sets, iterated in hash order)."""
    keys = set()
    for seed in ("1", "2", "3"):
        done = subprocess.run(
            [sys.executable, "-c", KEY_CHILD],
            env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        keys.add(done.stdout.strip().splitlines()[-1])
    assert len(keys) == 1, keys


def test_the_key_names_the_feature_bank(tiny_bundle: ModelBundle) -> None:
    """A bank changes the UNet's compiled graphs: its size and its reduction are in the key."""
    base = {"recipe": "r", "buckets": (1,), "latent_size": (16, 16)}

    def banked(**bank: Any) -> str:
        unet = copy.deepcopy(tiny_bundle.unet)
        bundle = dataclasses.replace(tiny_bundle, unet=unet).with_feature_bank(**bank)
        return artifact_key(bundle, **base)  # type: ignore[arg-type]

    keys = {
        artifact_key(tiny_bundle, **base),  # type: ignore[arg-type]
        banked(frames=2, rows=4),
        banked(frames=3, rows=4),
        banked(frames=2, rows=8),
        banked(frames=2, rows=4, tokens=BankTokens.MERGED),
        banked(frames=2, rows=4, reduce_from=64),
    }
    assert len(keys) == 6
    assert banked(frames=2, rows=4) == banked(frames=2, rows=4)


def test_the_cache_folder_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEDIFF_COMPILE_CACHE", "/srv/packages")
    assert cache_dir() == Path("/srv/packages")
    monkeypatch.setenv("LIVEDIFF_COMPILE_CACHE", "off")
    assert cache_dir() is None
    monkeypatch.delenv("LIVEDIFF_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert cache_dir() == Path("/xdg/livediff/compile")
