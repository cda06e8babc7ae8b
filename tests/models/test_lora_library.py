"""Per-session LoRAs against their oracle: one UNet call over rows with different LoRAs equals
separate calls of UNets with those LoRAs fused (the equation written out, and diffusers' own
loader through livediff's fused mode), in fp32 on CPU; loading, unloading and switching only
write buffers (no recompile); every refusal names what is wrong.

Tiny UNets are built here (linear ``proj_in``/``proj_out``, SD 2.1-like) and LoRAs are written
as real ``.safetensors`` files in the diffusers / PEFT and the kohya / A1111 layouts.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import constants as hf_constants

from helpers.lora_testing import (
    fused_copy,
    linear_targets,
    random_lora,
    save_kohya,
    save_peft,
    tiny_unet,
    unet_inputs,
    unet_only_bundle,
)
from livediff.exceptions import (
    BatchCompositionError,
    ModelLoadError,
    ModelNotAvailableError,
    ParameterError,
)
from livediff.models.architectures import build_random
from livediff.models.lora_library import LoraLibrary
from livediff.models.lora_store import LoraCapacity
from livediff.models.pipelines import fuse_loras
from livediff.models.presets import LoraRef, get_preset
from livediff.models.unet_batch import UNetBatch

TIGHT = {"rtol": 1e-5, "atol": 1e-5}  # fp32; one batched call vs separate calls
Layers = dict[str, tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture(scope="module")
def base() -> Any:
    return tiny_unet(seed=0)


@pytest.fixture(scope="module")
def loras(base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """LoRA A: PEFT layout, rank 8, alpha 4 (file scale 0.5), every layer; LoRA B: kohya
    layout, rank 4, alpha 2 (file scale 0.5), every other layer; C: kohya, rank 16, no alpha."""
    folder = tmp_path_factory.mktemp("loras")
    a, b, c = random_lora(base, 8, 1), random_lora(base, 4, 2, every=2), random_lora(base, 16, 3)
    return {
        "A": (a, 0.5, save_peft(a, folder / "a.safetensors", alpha=4.0)),
        "B": (b, 0.5, save_kohya(b, folder / "b.safetensors", alpha=2.0)),
        "C": (c, 1.0, save_kohya(c, folder / "c.safetensors")),
    }


def _library(base: Any, loras: dict[str, Any], *names: str, **capacity: int) -> LoraLibrary:
    unet = copy.deepcopy(base)
    library = LoraLibrary.attach(unet, LoraCapacity(**{"max_rank": 16, **capacity}))
    for name in names:
        library.load(name, str(loras[name][2]))
    return library


def _rows(inputs: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    return {k: v[row : row + 1] for k, v in inputs.items()}


@torch.no_grad()
def _call(unet: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return unet(**inputs, return_dict=False)[0]


def _fused(base: Any, loras: dict[str, Any], uses: list[tuple[str, float]]) -> Any:
    return fused_copy(base, [(loras[n][0], scale * loras[n][1]) for n, scale in uses])


def test_one_call_equals_each_row_with_its_lora_fused(base: Any, loras: dict[str, Any]) -> None:
    library = _library(base, loras, "A", "B")
    uses: list[list[tuple[str, float]]] = [[("A", 0.8)], [("B", 1.0)], []]
    inputs = unet_inputs(3, seed=1)
    with library.rows(*library.row_inputs(uses)):
        batched = _call(library.unet, inputs)
    for row, use in enumerate(uses):
        alone = _call(_fused(base, loras, use), _rows(inputs, row))
        torch.testing.assert_close(batched[row : row + 1], alone, **TIGHT)
    # The LoRAs do change the answer, far beyond the tolerance (the test can fail).
    plain = _call(base, inputs)
    assert (batched[:2] - plain[:2]).abs().amax() > 1e-2
    # Outside a call's selection the rewritten UNet is the base UNet.
    torch.testing.assert_close(_call(library.unet, inputs), plain, **TIGHT)


def test_two_loras_on_one_row_equal_both_fused(base: Any, loras: dict[str, Any]) -> None:
    library = _library(base, loras, "A", "B", "C")
    uses: list[list[tuple[str, float]]] = [[("A", 0.6), ("C", -0.7)], [("B", 1.2), ("A", 0.3)]]
    inputs = unet_inputs(2, seed=2)
    with library.rows(*library.row_inputs(uses)):
        batched = _call(library.unet, inputs)
    for row, use in enumerate(uses):
        alone = _call(_fused(base, loras, use), _rows(inputs, row))
        torch.testing.assert_close(batched[row : row + 1], alone, **TIGHT)


@pytest.mark.parametrize(("name", "scale"), [("A", 0.8), ("B", 1.0)])
def test_agrees_with_diffusers_fused_mode(
    base: Any, loras: dict[str, Any], name: str, scale: float
) -> None:
    """The same file through livediff's fused mode (diffusers' load_lora_weights + fuse_lora):
    a second reference, for the key mapping and the alpha of both layouts."""
    preset = get_preset("tiny")
    components = build_random(preset, full_vae=True)
    components.unet = copy.deepcopy(base)
    fuse_loras(preset, components, {}, (LoraRef(str(loras[name][2]), scale),), offline=True)
    assert all(type(m) is torch.nn.Linear for m in linear_targets(components.unet).values())
    library = _library(base, loras, name)
    inputs = unet_inputs(2, seed=3)
    with library.rows(*library.row_inputs([[(name, scale)], [(name, scale)]])):
        batched = _call(library.unet, inputs)
    torch.testing.assert_close(batched, _call(components.unet, inputs), **TIGHT)


def test_the_model_bundle_applies_the_batch_rows(base: Any, loras: dict[str, Any]) -> None:
    library = _library(base, loras, "A", "B")
    bundle = unet_only_bundle(library.unet).with_loras(library)
    inputs = unet_inputs(3, seed=4)
    indices, scales = library.row_inputs([[], [("B", 0.5)], [("A", 1.0)]])
    batch = UNetBatch(
        inputs["sample"],
        inputs["timestep"],
        inputs["encoder_hidden_states"],
        lora_indices=indices,
        lora_scales=scales,
    )
    with library.rows(indices, scales):
        expected = _call(library.unet, inputs)
    torch.testing.assert_close(bundle.predict_noise(batch), expected, rtol=0, atol=0)
    assert not torch.allclose(bundle.predict_noise(batch.narrow(0, 1)), expected[:1])  # rows kept
    with pytest.raises(BatchCompositionError, match="without a LoRA library"):
        unet_only_bundle(base).predict_noise(batch)


@pytest.mark.slow  # dynamo traces the whole tiny UNet (~1 min on a CI machine)
def test_load_unload_switch_without_recompiling(base: Any, loras: dict[str, Any]) -> None:
    torch._dynamo.reset()
    library = _library(base, loras, "A", max_loras=2)
    compiled = torch.compile(library.unet.forward, fullgraph=True, backend="aot_eager")
    inputs = unet_inputs(2, seed=5)
    steps: list[tuple[str, list[list[tuple[str, float]]]]] = [
        ("start", [[("A", 1.0)], []]),
        ("load B", [[("A", 1.0)], [("B", 0.7)]]),
        ("switch rows", [[("B", 0.7)], [("A", 0.4)]]),
        ("unload A, load C into its slot", [[("B", 0.7)], [("C", 0.9)]]),
    ]
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for label, uses in steps:
            if label == "load B":
                library.load("B", str(loras["B"][2]))
            if label.startswith("unload A"):
                slot = library.unload("A").slot
                assert library.load("C", str(loras["C"][2])).slot == slot
            with library.rows(*library.row_inputs(uses)):
                result = compiled(**inputs, return_dict=False)[0]
            for row, use in enumerate(uses):
                alone = _call(_fused(base, loras, use), _rows(inputs, row))
                torch.testing.assert_close(result[row : row + 1], alone, **TIGHT)


def test_unloaded_slot_adds_nothing(base: Any, loras: dict[str, Any]) -> None:
    library = _library(base, loras, "A")
    indices, scales = library.row_inputs([[("A", 1.0)]])
    library.unload("A")
    inputs = unet_inputs(1, seed=6)
    with library.rows(indices, scales):
        torch.testing.assert_close(_call(library.unet, inputs), _call(base, inputs), **TIGHT)
    with pytest.raises(ParameterError, match="unknown LoRA 'A'") as caught:
        library.row_inputs([[("A", 1.0)]])
    assert caught.value.field == "loras"


def test_memory_is_reported_per_lora(base: Any, loras: dict[str, Any]) -> None:
    library = _library(base, loras, max_rank=16, max_loras=3)
    entry = library.load("B", str(loras["B"][2]))
    layers = loras["B"][0]
    own = sum((down.numel() + up.numel()) * 4 for down, up in layers.values())
    targets = linear_targets(base)
    reserved = sum(16 * (m.in_features + m.out_features) * 4 for m in targets.values())
    assert (entry.rank, entry.layers, entry.bytes, entry.slot_bytes) == (
        4,
        len(layers),
        own,
        reserved,
    )
    assert library.store.total_bytes == 3 * reserved
    assert library.loaded()[0].describe()["bytes"] == own


# ---------------------------------------------------------------------------- refusals
def _refused(library: LoraLibrary, path: Path, error: type[Exception] = ModelLoadError) -> str:
    with pytest.raises(error) as caught:
        library.load("x", str(path))
    assert getattr(caught.value, "field", None) == "loras"
    return str(caught.value)


def test_a_convolution_lora_is_refused_naming_the_key(tmp_path: Path) -> None:
    # SD 1.5-like. Its 1x1 proj_in / proj_out convolutions are taken per session
    # (tests/models/test_lora_conv_proj.py); a resnet's 3x3 convolution (a LoCon) is not.
    unet = tiny_unet(use_linear_projection=False)
    library = LoraLibrary.attach(copy.deepcopy(unet), LoraCapacity(max_rank=16))
    conv = unet.down_blocks[0].resnets[0].conv1
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors = {
        f"{key}.lora_down.weight": torch.randn(4, conv.in_channels, 3, 3),
        f"{key}.lora_up.weight": torch.randn(conv.out_channels, 4, 1, 1),
    }
    message = _refused(library, save_kohya({}, tmp_path / "conv.safetensors", extra=tensors))
    assert f"{key}.lora_down.weight" in message and "convolution" in message
    assert "fused mode" in message


def test_a_lora_of_another_family_is_refused_naming_both_shapes(base: Any, tmp_path: Path) -> None:
    other = tiny_unet(cross_attention_dim=32)  # cross-attention keys 32 wide, not 24
    layers = random_lora(other, 4, 7)
    library = LoraLibrary.attach(copy.deepcopy(base), LoraCapacity(max_rank=16))
    message = _refused(library, save_peft(layers, tmp_path / "other.safetensors"))
    assert "attn2.to_k" in message and "(4, 32)" in message and "(4, 24)" in message
    assert "Linear(24 → 32)" in message and "another model family" in message


def test_layers_the_unet_lacks_or_that_are_not_targets_are_refused(
    base: Any, tmp_path: Path
) -> None:
    library = LoraLibrary.attach(copy.deepcopy(base), LoraCapacity(max_rank=16))
    missing = {"down_blocks.7.attentions.0.proj_in": (torch.randn(4, 32), torch.randn(32, 4))}
    assert "does not have" in _refused(library, save_peft(missing, tmp_path / "m.safetensors"))
    proj = base.down_blocks[0].resnets[0].time_emb_proj
    other = {
        "down_blocks.0.resnets.0.time_emb_proj": (
            torch.randn(4, proj.in_features),
            torch.randn(proj.out_features, 4),
        )
    }
    message = _refused(library, save_kohya(other, tmp_path / "t.safetensors"))
    assert "time_emb_proj" in message and "attention projections" in message
    lycoris = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.randn(4, 4)}
    message = _refused(library, save_kohya({}, tmp_path / "h.safetensors", extra=lycoris))
    assert "hada_w1_a" in message


def test_rank_capacity_and_names_are_checked(
    base: Any, loras: dict[str, Any], tmp_path: Path
) -> None:
    library = _library(base, loras, max_rank=8, max_loras=2)
    message = _refused(library, loras["C"][2])  # rank 16
    assert "rank 16" in message and "max_rank=8" in message
    library.load("A", str(loras["A"][2]))
    with pytest.raises(ParameterError, match="loaded already") as caught:
        library.load("A", str(loras["B"][2]))
    assert caught.value.field == "name"
    library.load("B", str(loras["B"][2]))
    assert "all 2 LoRA slots are in use" in _refused(library, loras["B"][2])
    with pytest.raises(ParameterError, match="combines up to 2") as too_many:
        library.row_inputs([[("A", 1.0), ("B", 1.0), ("A", 0.5)]])
    assert too_many.value.field == "loras"
    with pytest.raises(ParameterError, match="slots_per_row"):
        LoraCapacity(slots_per_row=0)


def test_bad_files_and_missing_sources(base: Any, tmp_path: Path) -> None:
    library = LoraLibrary.attach(copy.deepcopy(base), LoraCapacity(max_rank=16))
    with pytest.raises(ModelLoadError, match="no such file"):
        library.load("x", str(tmp_path / "absent.safetensors"))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    assert "not a readable .safetensors file" in _refused(library, junk)
    empty = save_kohya({}, tmp_path / "empty.safetensors", extra={"something": torch.ones(2)})
    assert "something" in _refused(library, empty)
    (tmp_path / "two").mkdir()
    for name in ("a", "b"):
        shutil.copy(empty, tmp_path / "two" / f"{name}.safetensors")
    with pytest.raises(ModelLoadError, match=r"holds 2 \.safetensors files"):
        library.load("x", str(tmp_path / "two"))


def test_text_encoder_parts_are_counted_and_not_applied(
    base: Any, loras: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layers = loras["B"][0]
    extra = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 8),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(8, 4),
    }
    path = save_kohya(layers, tmp_path / "te.safetensors", alpha=2.0, extra=extra)
    library = _library(base, loras)
    entry = library.load("te", str(path))
    assert entry.ignored_text_encoder_keys == 2
    assert "2 text-encoder keys are not applied" in caplog.text
    inputs = unet_inputs(1, seed=8)
    with library.rows(*library.row_inputs([[("te", 1.0)]])):
        result = _call(library.unet, inputs)
    torch.testing.assert_close(result, _call(_fused(base, loras, [("B", 1.0)]), inputs), **TIGHT)


def test_folder_and_cached_hf_id_sources(
    base: Any, loras: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "ink"
    folder.mkdir()
    shutil.copy(loras["A"][2], folder / "pytorch_lora_weights.safetensors")
    library = _library(base, loras)
    assert library.load("from folder", str(folder)).layers == len(loras["A"][0])
    assert hf_constants.HF_HUB_OFFLINE, "conftest turns HF_HUB_OFFLINE on for the whole run"
    cache = tmp_path / "hub"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(ModelNotAvailableError) as caught:
        library.load("hub", "livediff-tests/ink-lora")
    assert "'livediff-tests/ink-lora'" in str(caught.value) and str(cache) in str(caught.value)
    repo = cache / "models--livediff-tests--ink-lora"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    entry = library.load("hub", "livediff-tests/ink-lora")
    assert (entry.source, entry.layers) == ("livediff-tests/ink-lora", len(loras["A"][0]))


def test_fused_qkv_projections_are_refused(base: Any) -> None:
    unet = copy.deepcopy(base)
    unet.fuse_qkv_projections()
    with pytest.raises(ModelLoadError, match="fuse_qkv"):
        LoraLibrary.attach(unet)


def test_backends_that_would_drop_the_loras_refuse(base: Any) -> None:
    from livediff.exceptions import BackendError
    from livediff.models.recipe import Recipe, apply_recipe
    from livediff.models.tensorrt_engine import load_tensorrt_bundle

    unet = copy.deepcopy(base)
    library = LoraLibrary.attach(unet, LoraCapacity(max_rank=128))  # 3 × 128 > the kernel's 256
    bundle = unet_only_bundle(unet).with_loras(library)
    with pytest.raises(BackendError, match="max_rank 128 cannot share a fused q/k/v call"):
        apply_recipe(bundle, Recipe(fuse_qkv=True, compile=False))
    assert not library.store.fused  # refused before anything changed
    with pytest.raises(BackendError, match="does not run per-session LoRAs"):
        load_tensorrt_bundle(bundle)
    with pytest.raises(BatchCompositionError, match="belongs to the UNet"):
        unet_only_bundle(base).with_loras(bundle.loras)
