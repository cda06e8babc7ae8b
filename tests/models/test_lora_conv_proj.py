"""Per-session LoRAs on SD 1.5's 1×1 convolution ``proj_in`` / ``proj_out``
(``use_linear_projection=False``), as kohya trains them by default: one UNet call over rows with
different LoRAs equals each row's LoRA fused into a copy of the weights (the equation written
out) and diffusers' own ``load_lora_weights`` + ``fuse_lora`` (livediff's fused mode), in fp32
on CPU, in NCHW and channels-last memory formats; switching LoRAs does not recompile; other
convolution LoRAs are still refused naming the key.

The files carry the convolutions' 4-d weights (down ``[rank, in, 1, 1]``, up ``[out, rank, 1,
1]``) next to the attention and feed-forward keys, in the kohya / A1111 and diffusers / PEFT
layouts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers.lora_testing import (
    conv_targets,
    fused_copy,
    random_conv_lora,
    random_lora,
    save_kohya,
    save_kohya_original,
    save_peft,
    tiny_unet,
    unet_inputs,
)
from livediff.exceptions import ModelLoadError
from livediff.models import lora_layers
from livediff.models.architectures import build_random
from livediff.models.lora_layers import LoraRowsConv2d
from livediff.models.lora_library import LoraLibrary
from livediff.models.lora_store import LoraCapacity
from livediff.models.pipelines import fuse_loras
from livediff.models.presets import LoraRef, get_preset

TIGHT = {"rtol": 1e-5, "atol": 1e-5}  # fp32; one batched call vs separate calls
Layers = dict[str, tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture(scope="module")
def base() -> Any:
    unet = tiny_unet(seed=0, use_linear_projection=False)  # SD 1.5-like
    convs = conv_targets(unet)
    assert len(convs) == 2 * len([n for n, _ in unet.named_modules() if n.endswith("proj_in")])
    assert all(conv.kernel_size == (1, 1) for conv in convs.values())
    return unet


@pytest.fixture(scope="module")
def loras(base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``name: (layers, file scale, path)``. A: kohya, rank 4, alpha 2 (scale 0.5), every
    attention / feed-forward linear and every proj conv; B: PEFT, rank 8, alpha 4 (scale
    0.5), every other linear and every proj conv."""
    folder = tmp_path_factory.mktemp("conv-loras")
    a = {**random_lora(base, 4, 1), **random_conv_lora(base, 4, 11)}
    b = {**random_lora(base, 8, 2, every=2), **random_conv_lora(base, 8, 12)}
    return {
        "A": (a, 0.5, save_kohya(a, folder / "a.safetensors", alpha=2.0)),
        "B": (b, 0.5, save_peft(b, folder / "b.safetensors", alpha=4.0)),
    }


def _library(base: Any, loras: dict[str, Any], *names: str, **capacity: int) -> LoraLibrary:
    library = LoraLibrary.attach(copy.deepcopy(base), LoraCapacity(**{"max_rank": 8, **capacity}))
    for name in names:
        entry = library.load(name, str(loras[name][2]))
        assert entry.layers == len(loras[name][0])
    return library


def _row(inputs: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    return {k: v[row : row + 1] for k, v in inputs.items()}


@torch.no_grad()
def _call(unet: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return unet(**inputs, return_dict=False)[0]


def _fused(base: Any, loras: dict[str, Any], name: str, scale: float) -> Any:
    layers, file_scale, _ = loras[name]
    return fused_copy(base, [(layers, scale * file_scale)])


USES: list[list[tuple[str, float]]] = [[("A", 0.8)], [("B", 1.0)], []]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_one_call_equals_each_row_with_its_lora_fused(
    base: Any, loras: dict[str, Any], channels_last: bool
) -> None:
    library = _library(base, loras, "A", "B")
    inputs = unet_inputs(3, seed=1)
    if channels_last:
        library.unet.to(memory_format=torch.channels_last)
        inputs["sample"] = inputs["sample"].contiguous(memory_format=torch.channels_last)
    assert sum(isinstance(m, LoraRowsConv2d) for m in library.unet.modules()) == len(
        conv_targets(base)
    )
    with library.rows(*library.row_inputs(USES)):
        batched = _call(library.unet, inputs)
    plain = _call(base, inputs)
    for row, use in enumerate(USES):
        expected = _call(_fused(base, loras, *use[0]), _row(inputs, row)) if use else plain[2:]
        torch.testing.assert_close(batched[row : row + 1], expected, **TIGHT)
    # The convolutions' part shows, far beyond the tolerance: without it the rows differ.
    layers, file_scale, _ = loras["A"]
    linears_only = {k: v for k, v in layers.items() if v[0].ndim == 2}
    without_convs = _call(fused_copy(base, [(linears_only, 0.8 * file_scale)]), _row(inputs, 0))
    assert (batched[:1] - without_convs).abs().amax() > 1e-2
    # Outside a call's selection the rewritten UNet is the base UNet.
    torch.testing.assert_close(_call(library.unet, inputs), plain, **TIGHT)


def test_channels_last_updates_the_convolution_output_in_place(
    base: Any, loras: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In channels-last format the update reads the input and writes the output through views
    (no copy either way); in NCHW format both are copies."""
    library = _library(base, loras, "A")
    layer = library.unet.down_blocks[0].attentions[0].proj_in
    assert isinstance(layer, LoraRowsConv2d)
    seen: list[tuple[int, int]] = []
    real = lora_layers.lora_rows

    def spy(x: torch.Tensor, *args: Any, out: torch.Tensor) -> torch.Tensor:
        seen.append((x.data_ptr(), out.data_ptr()))
        return real(x, *args, out=out)

    monkeypatch.setattr(lora_layers, "lora_rows", spy)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, layer.in_channels, 4, 4, generator=gen)
    with torch.no_grad(), library.rows(*library.row_inputs([[("A", 1.0)], []])):
        y_nchw = layer(x)
        layer.to(memory_format=torch.channels_last)
        x_last = x.contiguous(memory_format=torch.channels_last)
        y_last = layer(x_last)
    assert seen[0][0] != x.data_ptr() and seen[0][1] != y_nchw.data_ptr()
    assert seen[1] == (x_last.data_ptr(), y_last.data_ptr())
    assert y_last.is_contiguous(memory_format=torch.channels_last) and y_nchw.is_contiguous()
    torch.testing.assert_close(y_last, y_nchw, **TIGHT)


@pytest.mark.parametrize(("name", "scale"), [("A", 0.8), ("B", 1.0)])
def test_agrees_with_diffusers_fused_mode(
    base: Any, loras: dict[str, Any], name: str, scale: float
) -> None:
    """The same file (conv proj_in / proj_out plus attention keys) fused by diffusers'
    load_lora_weights + fuse_lora, through livediff's fused mode, equals the per-session rows."""
    preset = get_preset("tiny")
    components = build_random(preset, full_vae=True)
    components.unet = copy.deepcopy(base)
    fuse_loras(preset, components, {}, (LoraRef(str(loras[name][2]), scale),), offline=True)
    fused_convs = conv_targets(components.unet)
    assert all(type(m) is torch.nn.Conv2d for m in fused_convs.values())
    changed = [
        n for n, m in fused_convs.items() if not torch.equal(m.weight, conv_targets(base)[n].weight)
    ]
    assert sorted(changed) == sorted(conv_targets(base))  # diffusers fused the conv parts too
    library = _library(base, loras, name)
    inputs = unet_inputs(2, seed=3)
    with library.rows(*library.row_inputs([[(name, scale)], [(name, scale)]])):
        batched = _call(library.unet, inputs)
    torch.testing.assert_close(batched, _call(components.unet, inputs), **TIGHT)
    assert (batched - _call(base, inputs)).abs().amax() > 1e-2  # the LoRA shows


def test_original_unet_names_on_the_sd15_layout(tmp_path: Path) -> None:
    """A kohya file in the original checkpoint's names (``input_blocks_1_1_proj_in`` …) on the
    SD 1.5 block layout with conv projections: per session equals diffusers' fused mode and
    the equation."""
    unet = tiny_unet(
        seed=4,
        use_linear_projection=False,
        block_out_channels=[16, 32, 32],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=2,
    )
    layers = {**random_lora(unet, 4, 5), **random_conv_lora(unet, 4, 6)}
    path = save_kohya_original(layers, tmp_path / "o.safetensors", unet.config, alpha=4.0)
    library = LoraLibrary.attach(copy.deepcopy(unet), LoraCapacity(max_rank=4))
    assert library.load("o", str(path)).layers == len(layers)
    preset = get_preset("tiny")
    components = build_random(preset, full_vae=True)
    components.unet = copy.deepcopy(unet)
    fuse_loras(preset, components, {}, (LoraRef(str(path), 0.6),), offline=True)
    inputs = unet_inputs(2, seed=7)
    with library.rows(*library.row_inputs([[("o", 0.6)], []])):
        batched = _call(library.unet, inputs)
    oracle = _call(fused_copy(unet, [(layers, 0.6)]), _row(inputs, 0))  # alpha 4 / rank 4
    torch.testing.assert_close(batched[:1], oracle, **TIGHT)
    torch.testing.assert_close(batched[:1], _call(components.unet, _row(inputs, 0)), **TIGHT)
    torch.testing.assert_close(batched[1:], _call(unet, _row(inputs, 1)), **TIGHT)
    assert (batched[:1] - _call(unet, _row(inputs, 0))).abs().amax() > 1e-2  # the LoRA shows


@pytest.mark.slow  # dynamo traces the whole tiny UNet (~1 min on a CI machine)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_switching_loras_does_not_recompile(
    base: Any, loras: dict[str, Any], channels_last: bool
) -> None:
    torch._dynamo.reset()
    library = _library(base, loras, "A", max_loras=2)
    inputs = unet_inputs(2, seed=5)
    if channels_last:
        library.unet.to(memory_format=torch.channels_last)
        inputs["sample"] = inputs["sample"].contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(library.unet.forward, fullgraph=True, backend="aot_eager")
    steps: list[tuple[str, list[list[tuple[str, float]]]]] = [
        ("start", [[("A", 1.0)], []]),
        ("load B", [[("A", 1.0)], [("B", 0.7)]]),
        ("switch rows", [[("B", 0.7)], [("A", 0.4)]]),
        ("unload A", [[("B", 0.7)], []]),
    ]
    plain = _call(base, inputs)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for label, uses in steps:
            if label == "load B":
                library.load("B", str(loras["B"][2]))
            if label == "unload A":
                library.unload("A")
            with library.rows(*library.row_inputs(uses)):
                result = compiled(**inputs, return_dict=False)[0]
            for row, use in enumerate(uses):
                alone = plain[row : row + 1]
                if use:
                    alone = _call(_fused(base, loras, *use[0]), _row(inputs, row))
                torch.testing.assert_close(result[row : row + 1], alone, **TIGHT)


# ---------------------------------------------------------------------------- refusals
def _refused(base: Any, tmp_path: Path, tensors: dict[str, torch.Tensor]) -> str:
    library = LoraLibrary.attach(copy.deepcopy(base), LoraCapacity(max_rank=8))
    path = save_kohya({}, tmp_path / "bad.safetensors", extra=tensors)
    with pytest.raises(ModelLoadError) as caught:
        library.load("bad", str(path))
    assert caught.value.field == "loras" and library.names() == ()
    return str(caught.value)


def _pair(key: str, down: tuple[int, ...], up: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {f"{key}.lora_down.weight": torch.ones(down), f"{key}.lora_up.weight": torch.ones(up)}


def test_other_convolution_loras_are_refused_naming_the_key(base: Any, tmp_path: Path) -> None:
    # A resnet's 3×3 convolution (a LoCon), next to a proj_in that would be taken.
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"
    key = "lora_unet_down_blocks_0_resnets_0_conv1"
    message = _refused(base, tmp_path, {**_pair(proj, (4, 32, 1, 1), (32, 4, 1, 1)),
                                        **_pair(key, (4, 32, 3, 3), (32, 4, 1, 1))})  # fmt: skip
    assert f"{key}.lora_down.weight" in message and "convolution LoRA" in message
    assert "3×3 Conv2d(32 → 32)" in message and "fused mode" in message
    # A 1×1 convolution that is not proj_in / proj_out (a resnet's shortcut), PEFT's spelling.
    shortcut = base.up_blocks[0].resnets[0].conv_shortcut
    assert shortcut.kernel_size == (1, 1)
    peft = "unet.up_blocks.0.resnets.0.conv_shortcut"
    message = _refused(base, tmp_path, {
        f"{peft}.lora_A.weight": torch.ones(4, shortcut.in_channels, 1, 1),
        f"{peft}.lora_B.weight": torch.ones(shortcut.out_channels, 4, 1, 1),
    })  # fmt: skip
    assert f"{peft}.lora_A.weight" in message and "convolution LoRA" in message
    # A 3×3 down on the 1×1 proj_in, and 2-d weights on it: the shapes are named.
    message = _refused(base, tmp_path, _pair(proj, (4, 32, 3, 3), (32, 4, 1, 1)))
    assert proj in message and "(4, 32, 3, 3)" in message and "(4, 32, 1, 1)" in message
    assert "1×1 Conv2d(32 → 32)" in message
    message = _refused(base, tmp_path, _pair(proj, (4, 32), (32, 4)))
    assert proj in message and "(4, 32)" in message and "needs down (4, 32, 1, 1)" in message
    # 4-d weights on a linear stay a convolution LoRA.
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    message = _refused(base, tmp_path, _pair(key, (4, 32, 1, 1), (32, 4, 1, 1)))
    assert key in message and "convolution LoRA (4-d" in message


def test_only_pointwise_convolutions_are_rewritten() -> None:
    conv = torch.nn.Conv2d(8, 8, kernel_size=3, padding=1)
    buffers = torch.zeros(1, 8, 4), torch.zeros(1, 4, 8)
    with pytest.raises(ModelLoadError, match="1×1 convolutions only"):
        LoraRowsConv2d(conv, *buffers, lora_layers.RowSelection())
