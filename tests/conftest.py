"""Shared fixtures: tiny models built offline, and the ``gpu`` marker's skip rule.

No test may reach the network: ``HF_HUB_OFFLINE`` is forced on for the whole run, so a
missing model fails with livediff's own error instead of a download attempt.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from livediff.models.bundle import ModelBundle
from livediff.models.export import export_model
from livediff.models.loading import ModelSpec, load_model


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_bundle() -> ModelBundle:
    """The ``tiny`` preset with random weights on CPU in float32."""
    return load_model(ModelSpec(preset="tiny", weights="random"), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved diffusers folder of the tiny model (with ``vae_tiny/``), as ``livediff export`` writes it."""
    return export_model(
        ModelSpec(preset="tiny", weights="random", seed=1),
        tmp_path_factory.mktemp("tiny") / "model",
    )


@pytest.fixture(scope="session")
def cuda_tiny_bundle() -> ModelBundle:
    """The tiny preset on CUDA in float16 (gpu tests only)."""
    return load_model(ModelSpec(preset="tiny", weights="random"), device="cuda", dtype="fp16")
