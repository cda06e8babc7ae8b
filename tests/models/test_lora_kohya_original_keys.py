"""kohya LoRA files in the original checkpoint's (LDM / SGM) key names — how kohya writes SDXL
LoRAs (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), and how some tools
write SD 1.5 ones — against three references: the LoRA equation on the diffusers module names
(the same LoRA written with diffusers' names), diffusers' own ``load_lora_weights`` +
``fuse_lora`` (livediff's fused mode, which renumbers those keys itself), and the real SD 1.5 /
SD 2.1 / SDXL layouts' numbering. Tiny UNets with the SD 1.5 and the SDXL block layouts (two
resnets per block, attention in the first / last blocks, SDXL's deeper transformers), fp32 on
CPU.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from helpers.lora_testing import (
    fused_copy,
    original_unet_name,
    random_lora,
    save_kohya,
    save_kohya_original,
    tiny_unet,
    unet_inputs,
)
from livediff.exceptions import ModelLoadError
from livediff.models.architectures import build_random
from livediff.models.bundle import ModelBundle
from livediff.models.lora_ldm_keys import LdmLayout
from livediff.models.lora_library import LoraLibrary
from livediff.models.lora_store import LoraCapacity
from livediff.models.pipelines import fuse_loras
from livediff.models.presets import Family, LoraRef, ModelPreset, get_preset

TIGHT = {"rtol": 1e-5, "atol": 1e-5}
CA, DOWN, UP = "CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D"
LAYOUTS: dict[str, dict[str, Any]] = {
    # SD 1.5 / 2.1: attention in all down blocks but the last, all up blocks but the first.
    "sd15": {
        "block_out_channels": [16, 32, 32],
        "down_block_types": [CA, CA, DOWN],
        "up_block_types": [UP, "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
    },
    # SDXL: no attention in the first down / last up block; deeper transformers further down.
    "sdxl": {
        "block_out_channels": [16, 32, 32],
        "down_block_types": [DOWN, CA, CA],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", UP],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 1, 2],
    },
}
TEXT_ENCODER_KEYS = tuple(  # kohya's SDXL text-encoder parts, on the tiny CLIPs (width 32)
    f"lora_te{encoder}_text_model_encoder_layers_{layer}_{module}"
    for encoder in (1, 2)
    for layer, module in ((0, "self_attn_q_proj"), (0, "self_attn_out_proj"), (1, "mlp_fc1"))
)


def _unet(layout: str, seed: int = 0) -> UNet2DConditionModel:
    return tiny_unet(seed=seed, **LAYOUTS[layout])


def _library(unet: Any, files: dict[str, Path]) -> LoraLibrary:
    library = LoraLibrary.attach(copy.deepcopy(unet), LoraCapacity(max_rank=16))
    for name, path in files.items():
        library.load(name, str(path))
    return library


def _inputs(unet: Any, rows: int, seed: int) -> dict[str, Any]:
    inputs: dict[str, Any] = unet_inputs(rows, seed=seed, unet=unet)
    if unet.config.addition_embed_type == "text_time":  # SDXL's pooled embeds and time ids
        gen = torch.Generator().manual_seed(seed + 100)
        times = 6 * unet.config.addition_time_embed_dim
        pooled = unet.config.projection_class_embeddings_input_dim - times
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(rows, pooled, generator=gen),
            "time_ids": torch.randn(rows, 6, generator=gen),
        }
    return inputs


def _row(inputs: dict[str, Any], row: int) -> dict[str, Any]:
    return {k: _row(v, row) if isinstance(v, dict) else v[row : row + 1] for k, v in inputs.items()}


@torch.no_grad()
def _call(unet: Any, inputs: dict[str, Any]) -> torch.Tensor:
    return unet(**inputs, return_dict=False)[0]


def _text_encoder_parts(rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    parts = {}
    for key in TEXT_ENCODER_KEYS:
        width_out = 64 if key.endswith("fc1") else 32
        parts[f"{key}.lora_down.weight"] = torch.randn(rank, 32, generator=gen) * 0.2
        parts[f"{key}.lora_up.weight"] = torch.randn(width_out, rank, generator=gen) * 0.2
        parts[f"{key}.alpha"] = torch.tensor(float(rank))
    return parts


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_original_names_equal_the_lora_with_diffusers_names(layout: str, tmp_path: Path) -> None:
    """Rows with the original-named file and with the same LoRA in diffusers' names give the
    same output, and each equals the LoRA fused by the equation (alpha 2, rank 4: scale 0.5)."""
    unet = _unet(layout)
    layers = random_lora(unet, 4, seed=1)
    original = save_kohya_original(layers, tmp_path / "o.safetensors", unet.config, alpha=2.0)
    assert any("input_blocks_" in key for key in _keys(original))
    renamed = save_kohya(layers, tmp_path / "d.safetensors", alpha=2.0)
    library = _library(unet, {"original": original, "diffusers": renamed})
    assert [entry.layers for entry in library.loaded()] == [len(layers)] * 2
    uses: list[list[tuple[str, float]]] = [[("original", 0.8)], [("diffusers", 0.8)], []]
    inputs = _inputs(unet, 3, seed=2)
    with library.rows(*library.row_inputs(uses)):
        batched = _call(library.unet, inputs)
    fused = fused_copy(unet, [(layers, 0.8 * 0.5)])
    for row in (0, 1):
        torch.testing.assert_close(batched[row : row + 1], _call(fused, _row(inputs, row)), **TIGHT)
    plain = _call(unet, inputs)
    torch.testing.assert_close(batched[2:3], plain[2:3], **TIGHT)
    assert (batched[:2] - plain[:2]).abs().amax() > 1e-2  # the LoRA shows


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def _sdxl_preset(unet: Any) -> ModelPreset:
    """The tiny preset as SDXL (two text encoders) around ``unet``'s config."""
    tiny = get_preset("tiny")
    text = tiny.text_configs[0]
    return dataclasses.replace(
        tiny,
        name="tiny-xl",
        family=Family.SDXL,
        unet_config=dict(unet.config),
        text_configs=(text, text),
    )


def _fused_by_diffusers(preset: ModelPreset, unet: Any, path: Path, scale: float) -> Any:
    components = build_random(preset, full_vae=True)
    before = copy.deepcopy(components.text_encoders)
    components.unet = copy.deepcopy(unet)
    fuse_loras(preset, components, {}, (LoraRef(str(path), scale),), offline=True)
    return components, before


@pytest.mark.parametrize("layout", ["sd15", "sdxl", "tiny_sdxl_bundle"])
def test_per_session_equals_diffusers_fused_mode(
    layout: str,
    tiny_sdxl_bundle: ModelBundle,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same file fused by diffusers (``--lora``: load_lora_weights + fuse_lora, which maps
    the original names itself) and applied per session (library + per-row update) agree; the
    SDXL files' ``lora_te1_`` / ``lora_te2_`` parts are fused by diffusers into the text
    encoders and, per session, counted, logged and left out."""
    unet = tiny_sdxl_bundle.unet if layout == "tiny_sdxl_bundle" else _unet(layout)
    sdxl = layout != "sd15"
    preset = _sdxl_preset(unet) if sdxl else get_preset("tiny")
    layers = random_lora(unet, 8, seed=3)
    extra = _text_encoder_parts(4) if sdxl else None
    path = save_kohya_original(layers, tmp_path / "x.safetensors", unet.config, 4.0, extra)
    components, before = _fused_by_diffusers(preset, unet, path, scale=0.7)
    library = _library(unet, {})
    entry = library.load("x", str(path))
    assert entry.layers == len(layers)
    inputs = _inputs(unet, 2, seed=4)
    with library.rows(*library.row_inputs([[("x", 0.7)], [("x", 0.7)]])):
        batched = _call(library.unet, inputs)
    fused = _call(components.unet, inputs)
    torch.testing.assert_close(batched, fused, **TIGHT)
    oracle = _call(fused_copy(unet, [(layers, 0.7 * 4.0 / 8)]), inputs)
    torch.testing.assert_close(fused, oracle, **TIGHT)
    assert (fused - _call(unet, inputs)).abs().amax() > 1e-2  # the LoRA shows
    if sdxl:
        assert entry.ignored_text_encoder_keys == 18
        assert "18 text-encoder keys are not applied" in caplog.text
        for encoder, old in zip(components.text_encoders, before, strict=True):
            changed = [
                k
                for k, v in encoder.state_dict().items()
                if not torch.equal(v, old.state_dict()[k])
            ]
            assert len(changed) == 3, changed  # fused mode applied each encoder's part


# The attention blocks of the real checkpoints, in kohya's (original) and diffusers' names.
SD_ATTENTIONS = {
    **{f"input_blocks_{n}_1": f"down_blocks.{(n - 1) // 3}.attentions.{(n - 1) % 3}"
       for n in (1, 2, 4, 5, 7, 8)},
    "middle_block_1": "mid_block.attentions.0",
    **{f"output_blocks_{n}_1": f"up_blocks.{n // 3}.attentions.{n % 3}" for n in range(3, 12)},
}  # fmt: skip
SDXL_ATTENTIONS = {
    "input_blocks_4_1": "down_blocks.1.attentions.0",
    "input_blocks_5_1": "down_blocks.1.attentions.1",
    "input_blocks_7_1": "down_blocks.2.attentions.0",
    "input_blocks_8_1": "down_blocks.2.attentions.1",
    "middle_block_1": "mid_block.attentions.0",
    **{f"output_blocks_{n}_1": f"up_blocks.{n // 3}.attentions.{n % 3}" for n in range(6)},
}


@pytest.mark.parametrize(
    ("preset", "attentions"),
    [("sdxl-turbo", SDXL_ATTENTIONS), ("sd-turbo", SD_ATTENTIONS), ("sd15-lcm", SD_ATTENTIONS)],
)
def test_the_real_layouts_numbering(preset: str, attentions: dict[str, str]) -> None:
    """On the real UNets (built on the meta device), every attention block kohya names maps to
    the diffusers block of that checkpoint's published numbering, and every attention block is
    one of them; the test helper that writes the files numbers them the same way."""
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(get_preset(preset).unet_config)
    names = [name for name, _ in unet.named_modules()]
    layout = LdmLayout.of(names)
    blocks = {n for n in names if n.rsplit(".", 2)[-2:-1] == ["attentions"]}
    assert blocks == set(attentions.values())
    for original, diffusers_name in attentions.items():
        for inner in (
            "transformer_blocks_0_attn2_to_k",
            "proj_in",
            "transformer_blocks_0_ff_net_2",
        ):
            expected = f"{diffusers_name.replace('.', '_')}_{inner}"
            assert layout.diffusers_spelling(f"{original}_{inner}") == expected
        assert (
            original_unet_name(f"{diffusers_name}.proj_out", unet.config) == f"{original}_proj_out"
        )
    # Resnets and samplers map too (so their refusals name the diffusers layer).
    assert layout.diffusers_spelling("input_blocks_3_0_op") == "down_blocks_0_downsamplers_0_conv"
    upsampler = "output_blocks_2_2_conv" if preset == "sdxl-turbo" else "output_blocks_2_1_conv"
    assert layout.diffusers_spelling(upsampler) == "up_blocks_0_upsamplers_0_conv"
    assert layout.diffusers_spelling("output_blocks_1_2_conv") is None  # not the block's last
    assert layout.diffusers_spelling("input_blocks_4_0_emb_layers_1") == (
        "down_blocks_1_resnets_0_time_emb_proj"
    )


def test_original_keys_that_do_not_fit_are_refused_naming_the_key(tmp_path: Path) -> None:
    unet = _unet("sdxl")
    library = _library(unet, {})

    def refused(tensors: dict[str, torch.Tensor]) -> str:
        path = tmp_path / "bad.safetensors"
        save_kohya({}, path, extra=tensors)
        with pytest.raises(ModelLoadError) as caught:
            library.load("bad", str(path))
        assert "bad" not in library.names()
        return str(caught.value)

    def pair(key: str, down: tuple[int, ...], up: tuple[int, ...]) -> dict[str, torch.Tensor]:
        return {
            f"{key}.lora_down.weight": torch.ones(down),
            f"{key}.lora_up.weight": torch.ones(up),
        }

    # A block this UNet does not have (a deeper model's numbering).
    key = "lora_unet_input_blocks_11_1_transformer_blocks_0_attn1_to_q"
    message = refused(pair(key, (4, 32), (32, 4)))
    assert key in message and "does not have" in message
    # SDXL's first down block has no attention.
    key = "lora_unet_input_blocks_1_1_proj_in"
    assert key in refused(pair(key, (4, 16), (16, 4)))
    # A resnet convolution (LoCon): refused as a convolution LoRA, for fused mode.
    key = "lora_unet_input_blocks_1_0_in_layers_2"
    message = refused(pair(key, (4, 16, 3, 3), (16, 4, 1, 1)))
    assert key in message and "convolution LoRA" in message
    # A resnet's linear time projection is not one of the per-session layers.
    key = "lora_unet_output_blocks_0_0_emb_layers_1"
    message = refused(pair(key, (4, 64), (32, 4)))
    assert key in message and "up_blocks.0.resnets.0.time_emb_proj" in message
    # An SDXL-numbered file on the SD 1.5 layout: the numbering lands on other widths.
    sdxl_unet = _unet("sdxl")
    path = save_kohya_original(random_lora(sdxl_unet, 4, 5), tmp_path / "xl.safetensors",
                               sdxl_unet.config)  # fmt: skip
    with pytest.raises(ModelLoadError, match=r"key lora_unet_\S+ (has down|targets a layer)"):
        _library(_unet("sd15"), {"xl": path})
