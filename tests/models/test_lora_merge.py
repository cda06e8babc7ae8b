"""Per-session LoRAs folded into the weights while every row agrees (models/lora_merge.py).

Against the oracle of tests/models/test_lora_library.py (the LoRA equation written into a copy
of the UNet, no LoRA code of livediff involved), in fp32 on CPU: a merged call equals the
rows' LoRAs fused; the base weights come back bit for bit; the rule (merge only after calls
agree, never on calls that differ or alternate, base weights after a load or unload) holds;
layers without a plain weight (FP8) and a turned-off merge never fold anything.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.lora_testing import (
    fused_copy,
    random_lora,
    save_peft,
    tiny_unet,
    unet_inputs,
    unet_only_bundle,
)
from livediff.engine.lora_plan import lora_inputs
from livediff.models.fp8 import Fp8Compute, Fp8Linear
from livediff.models.lora_layers import LoraRowsConv2d, LoraRowsLinear
from livediff.models.lora_library import LoraLibrary
from livediff.models.lora_merge import MERGE_AFTER_CALLS, NO_LORAS, MergeConfig
from livediff.models.lora_store import LoraCapacity
from livediff.models.unet_batch import UNetBatch

TIGHT = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def base() -> Any:
    return tiny_unet(seed=0)


@pytest.fixture(scope="module")
def files(base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """X: rank 8, alpha 4 (file scale 0.5), every layer; Y: rank 4, every other layer."""
    folder = tmp_path_factory.mktemp("loras")
    x, y = random_lora(base, 8, 21), random_lora(base, 4, 22, every=2)
    return {
        "X": (x, 0.5, save_peft(x, folder / "x.safetensors", alpha=4.0)),
        "Y": (y, 1.0, save_peft(y, folder / "y.safetensors")),
    }


def _library(base: Any, files: dict[str, Any], config: MergeConfig | None = None) -> LoraLibrary:
    library = LoraLibrary.attach(copy.deepcopy(base), LoraCapacity(max_rank=16), merge=config)
    for name in files:
        library.load(name, str(files[name][2]))
    return library


def _weights(library: LoraLibrary) -> dict[str, torch.Tensor]:
    return {
        name: module.base.weight.detach().clone()
        for name, module in library.unet.named_modules()
        if isinstance(module, LoraRowsLinear)
    }


def _batch(library: LoraLibrary, uses: list[list[tuple[str, float]]], seed: int) -> UNetBatch:
    inputs = unet_inputs(len(uses), seed=seed)
    indices, scales = library.row_inputs(uses)
    return UNetBatch(
        inputs["sample"],
        inputs["timestep"],
        inputs["encoder_hidden_states"],
        lora_indices=indices,
        lora_scales=scales,
    )


def _oracle(base: Any, files: dict[str, Any], uses: list[tuple[str, float]], batch: UNetBatch):
    fused = fused_copy(base, [(files[n][0], s * files[n][1]) for n, s in uses])
    with torch.no_grad():
        return fused(batch.latents, batch.timesteps, batch.embeds, return_dict=False)[0]


def _call(library: LoraLibrary, rows: list[list[tuple[str, float]]], seed: int = 0):
    """One engine call whose sessions are ``rows`` (one row each): ``(sent LoRA inputs, eps)``."""
    bundle = unet_only_bundle(library.unet).with_loras(library)
    batches = [_batch(library, [uses], seed + k) for k, uses in enumerate(rows)]
    keys = [library.merge_key(uses) for uses in rows]
    sent = lora_inputs(bundle, batches, keys)
    eps = [bundle.predict_noise(b) for b in sent]
    return [b.lora_indices is not None for b in sent], eps, batches


def _merged(
    base: Any, files: dict[str, Any], uses: list[tuple[str, float]]
) -> tuple[LoraLibrary, dict[str, torch.Tensor]]:
    """A library whose weights hold ``uses`` (a lone session's calls), and its base weights."""
    library = _library(base, files)
    original = _weights(library)
    for call in range(MERGE_AFTER_CALLS):
        _call(library, [uses], seed=call)
    assert library.merge.merged == library.merge_key(uses) != NO_LORAS
    return library, original


def _base_weights_back(library: LoraLibrary, original: dict[str, torch.Tensor]) -> bool:
    return library.merge.merged == NO_LORAS and all(
        torch.equal(original[n], w) for n, w in _weights(library).items()
    )


def test_agreeing_calls_merge_after_a_streak_and_equal_the_fused_model(
    base: Any, files: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="livediff.models.lora_merge")
    library = _library(base, files)
    original = _weights(library)
    uses = [("X", 0.8), ("Y", -0.6)]
    for call in range(MERGE_AFTER_CALLS + 2):
        rows_sent, eps, batches = _call(library, [uses, uses], seed=10 * call)
        merged = call + 1 >= MERGE_AFTER_CALLS
        assert rows_sent == [not merged, not merged], call  # per-row until the streak
        assert library.merge.merged == (library.merge_key(uses) if merged else NO_LORAS)
        for batch, out in zip(batches, eps, strict=True):
            torch.testing.assert_close(out, _oracle(base, files, uses, batch), **TIGHT)
    assert library.merge.merges == 1  # folded once, then kept
    assert library.merge.refusal() == ""
    assert not any("not merged" in r.getMessage() for r in caplog.records)
    assert sum("folding them" in r.getMessage() for r in caplog.records) == 1
    assert library.merge.base_bytes == sum(w.numel() * 4 for w in original.values())
    # The LoRAs change the answer far beyond the tolerance: the comparison can fail.
    plain = _oracle(base, files, [], batches[0])
    assert (eps[0] - plain).abs().amax() > 1e-2


def test_rows_that_differ_restore_the_base_weights_bit_for_bit(
    base: Any, files: dict[str, Any]
) -> None:
    library, original = _merged(base, files, [("X", 1.0)])
    assert any(not torch.equal(original[n], w) for n, w in _weights(library).items())
    mixed = [[("X", 1.0)], [("Y", 0.5)], []]
    rows_sent, eps, batches = _call(library, mixed, seed=99)
    assert rows_sent == [True, True, True]
    assert _base_weights_back(library, original)
    for uses, batch, out in zip(mixed, batches, eps, strict=True):
        torch.testing.assert_close(out, _oracle(base, files, uses, batch), **TIGHT)


def test_no_row_with_a_lora_sends_no_lora_inputs_on_the_base_weights(
    base: Any, files: dict[str, Any]
) -> None:
    library, original = _merged(base, files, [("Y", 1.0)])
    rows_sent, eps, batches = _call(library, [[], [("X", 0.0)]], seed=5)  # scale 0 is none
    assert rows_sent == [False, False]
    assert _base_weights_back(library, original)
    torch.testing.assert_close(eps[0], _oracle(base, files, [], batches[0]), **TIGHT)


def test_alternating_sets_never_merge(base: Any, files: dict[str, Any]) -> None:
    """Calls that alternate between two agreeing sets (sessions at two resolutions) would copy
    weights at every call; they stay on the per-row path."""
    library = _library(base, files)
    for call in range(3 * MERGE_AFTER_CALLS):
        uses = [("X", 1.0)] if call % 2 else [("Y", 1.0)]
        rows_sent, eps, batches = _call(library, [uses], seed=call)
        assert rows_sent == [True]
        torch.testing.assert_close(eps[0], _oracle(base, files, uses, batches[0]), **TIGHT)
    assert library.merge.merges == 0


def test_a_load_or_unload_puts_the_base_weights_back(
    base: Any, files: dict[str, Any], tmp_path: Path
) -> None:
    library, original = _merged(base, files, [("X", 1.0)])
    library.unload("X")  # e.g. the last session using it left; the slot may be reused
    assert _base_weights_back(library, original)
    z = random_lora(base, 8, 23)
    library.load("Z", str(save_peft(z, tmp_path / "z.safetensors")))  # into X's old slot
    assert library.store.get("Z").slot == 0
    for call in range(MERGE_AFTER_CALLS):
        rows_sent, eps, batches = _call(library, [[("Z", 0.7)]], seed=call)
    assert rows_sent == [False]
    torch.testing.assert_close(
        eps[0], _oracle(base, {"Z": (z, 1.0, None)}, [("Z", 0.7)], batches[0]), **TIGHT
    )


def test_merging_turned_off_keeps_the_per_row_path(base: Any, files: dict[str, Any]) -> None:
    library = _library(base, files, MergeConfig(enabled=False))
    original = _weights(library)
    for call in range(2 * MERGE_AFTER_CALLS):
        rows_sent, _, _ = _call(library, [[("X", 1.0)]], seed=call)
        assert rows_sent == [True]
    assert all(torch.equal(original[n], w) for n, w in _weights(library).items())
    assert library.merge.refusal() == "turned off"
    rows_sent, _, _ = _call(library, [[]])  # rows without LoRAs still skip the kernels
    assert rows_sent == [False]


def test_fp8_base_layers_are_never_merged(
    base: Any, files: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    library = _library(base, files)
    for module in library.unet.modules():  # as the recipe's FP8 step does after attaching
        if isinstance(module, LoraRowsLinear) and isinstance(module.base, torch.nn.Linear):
            module.base = Fp8Linear.from_linear(module.base, compute=Fp8Compute.REFERENCE)
    with caplog.at_level(logging.INFO, logger="livediff.models.lora_merge"):
        for call in range(2 * MERGE_AFTER_CALLS):
            rows_sent, _, _ = _call(library, [[("X", 1.0)]], seed=call)
            assert rows_sent == [True]
    assert "Fp8Linear" in (library.merge.refusal() or "")
    assert sum("not merged" in r.getMessage() for r in caplog.records) == 1  # said once


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_sd15_style_1x1_convolutions_merge_in_place(channels_last: bool, tmp_path: Path) -> None:
    """SD 1.5's ``proj_in`` / ``proj_out`` are 1×1 convolutions: their weights fold through
    an ``[out, in]`` view, in the recipe's channels-last layout too, and come back bit for bit."""
    from helpers.lora_testing import random_conv_lora, save_kohya

    conv_base = tiny_unet(seed=0, use_linear_projection=False)
    layers = {**random_lora(conv_base, 4, 31), **random_conv_lora(conv_base, 4, 32)}
    path = save_kohya(layers, tmp_path / "conv.safetensors", alpha=4.0)  # file scale 1
    library = LoraLibrary.attach(copy.deepcopy(conv_base), LoraCapacity(max_rank=8))
    library.load("C", str(path))
    if channels_last:
        library.unet.to(memory_format=torch.channels_last)
    convs = {
        name: module.base.weight.detach().clone()
        for name, module in library.unet.named_modules()
        if isinstance(module, LoraRowsConv2d)
    }
    assert convs
    for call in range(MERGE_AFTER_CALLS):
        rows_sent, eps, batches = _call(library, [[("C", 0.7)]], seed=call)
    assert rows_sent == [False]
    fused = fused_copy(conv_base, [(layers, 0.7)])
    with torch.no_grad():
        want = fused(
            batches[0].latents, batches[0].timesteps, batches[0].embeds, return_dict=False
        )[0]
    torch.testing.assert_close(eps[0], want, **TIGHT)
    _call(library, [[("C", 0.7)], []])  # rows differ: base weights back
    for name, module in library.unet.named_modules():
        if isinstance(module, LoraRowsConv2d):
            assert torch.equal(module.base.weight, convs[name]), name


@pytest.mark.parametrize("merge", [True, False])
def test_the_library_setting_reaches_the_merge(
    base: Any, files: dict[str, Any], tmp_path: Path, merge: bool
) -> None:
    """``[lora_library] merge`` / ``--no-lora-merge`` as the server attaches its library."""
    from livediff.models.lora_library_config import LoraLibraryConfig
    from livediff.models.lora_setup import attach_lora_library

    folder = tmp_path / "library"
    folder.mkdir()
    (folder / "x.safetensors").write_bytes(Path(files["X"][2]).read_bytes())
    config = LoraLibraryConfig(library=str(folder), max_rank=16, merge=merge)
    bundle = attach_lora_library(unet_only_bundle(copy.deepcopy(base)), config)
    library = bundle.loras
    assert library is not None and library.merge.config.enabled is merge
    for call in range(MERGE_AFTER_CALLS):
        rows_sent, _, _ = _call(library, [[("x", 1.0)]], seed=call)
    assert rows_sent == [not merge]
