"""Shared fixtures: tiny models built offline, and the ``gpu`` marker's skip rule.

No test may reach the network: ``HF_HUB_OFFLINE`` is forced on for the whole run, so a
missing model fails with livediff's own error instead of a download attempt.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from livediff.models.architectures import build_random
from livediff.models.bundle import ModelBundle, WeightsMode
from livediff.models.export import export_model
from livediff.models.loading import ModelSpec, load_model
from livediff.models.presets import Family, get_preset


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    # The WebRTC modules' tests are skipped here and run inside a loopback-only network
    # namespace (helpers.streams_testing.netns_module_runner): report them as run there.
    streams_testing = sys.modules.get("helpers.streams_testing")
    if streams_testing is not None:
        streams_testing.report_netns_runs(terminalreporter)


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
def tiny_sdxl_bundle() -> ModelBundle:
    """The tiny preset rebuilt as SDXL: two text encoders, pooled embeds and time ids (CPU, fp32)."""
    tiny = get_preset("tiny")
    unet = dict(tiny.unet_config, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"])
    unet.update(
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=64,  # the two encoders' hidden states side by side
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # time ids + pooled width
        use_linear_projection=True,
    )
    text = tiny.text_configs[0]
    preset = dataclasses.replace(
        tiny, name="tiny-xl", family=Family.SDXL, unet_config=unet, text_configs=(text, text)
    )
    parts = build_random(preset, seed=5)
    assert parts.tiny_vae is not None
    return ModelBundle(
        preset=preset,
        unet=parts.unet.eval(),
        vae=parts.tiny_vae.eval(),
        text_encoders=tuple(e.eval() for e in parts.text_encoders),
        tokenizers=parts.tokenizers,
        scheduler_config=dict(preset.scheduler_config),
        device=torch.device("cpu"),
        dtype=torch.float32,
        weights=WeightsMode.RANDOM,
        source="test",
    )


@pytest.fixture(scope="session")
def cuda_tiny_bundle() -> ModelBundle:
    """The tiny preset on CUDA in float16 (gpu tests only)."""
    return load_model(ModelSpec(preset="tiny", weights="random"), device="cuda", dtype="fp16")
