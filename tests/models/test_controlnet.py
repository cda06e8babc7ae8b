"""ControlNets at the model level: livediff's per-row call against diffusers' pipelines, and loading.

The oracle is diffusers' own ControlNet img2img pipelines (SD, SDXL, SDXL union) run end to
end on tiny random models: hooks record every UNet call the pipeline makes (its inputs and
the noise it predicted, with the residuals of the pipeline's own ControlNet calls), and
livediff's ``ModelBundle.predict_noise`` must give the same noise for the same inputs and
control images, with the scales written per row. fp32 on the CPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    ControlNetModel,
    LCMScheduler,
    MultiControlNetModel,
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetUnionImg2ImgPipeline,
)
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from helpers.ldm_checkpoint import controlnet_to_ldm
from livediff.engine.batch_packing import BatchPacker
from livediff.exceptions import BackendError, ModelLoadError, ModelNotAvailableError, ParameterError
from livediff.models.architectures import build_full_vae
from livediff.models.bundle import ModelBundle
from livediff.models.controlnet import UNION_CONTROL_TYPES, ControlNetSpec, LoadedControlNet
from livediff.models.controlnet_loading import family_architecture, load_controlnet
from livediff.models.presets import get_preset
from livediff.models.tensorrt_engine import load_tensorrt_bundle
from livediff.models.unet_batch import UNetBatch

SIZE = 128  # the tiny models' pixel size
ATOL = 1e-5


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _embeds(bundle: ModelBundle, seed: int) -> torch.Tensor:
    seq, dim = bundle.embed_shape
    return torch.randn(1, seq, dim, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd_nets(tiny_bundle: ModelBundle) -> tuple[LoadedControlNet, LoadedControlNet]:
    return (
        load_controlnet(ControlNetSpec("random", name="a", seed=1), tiny_bundle),
        load_controlnet(ControlNetSpec("random", name="b", seed=2), tiny_bundle),
    )


@pytest.fixture(scope="module")
def xl_nets(tiny_sdxl_bundle: ModelBundle) -> tuple[LoadedControlNet, LoadedControlNet]:
    return (
        load_controlnet(ControlNetSpec("random", name="a", seed=3), tiny_sdxl_bundle),
        load_controlnet(ControlNetSpec("random", name="b", seed=4), tiny_sdxl_bundle),
    )


# ---------------------------------------------------------------- the pipeline as the oracle
def recorded_unet_calls(unet: Any, run: Callable[[], Any]) -> list[dict[str, Any]]:
    """Every call ``run`` makes to ``unet``: its sample, timestep, keyword inputs and output."""
    calls: list[dict[str, Any]] = []

    def before(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append({"sample": args[0], "timestep": args[1], **kwargs})

    def after(_module: Any, _args: Any, _kwargs: Any, output: Any) -> None:
        calls[-1]["noise"] = output[0]

    handles = [
        unet.register_forward_pre_hook(before, with_kwargs=True),
        unet.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    assert calls, "the pipeline never called its UNet"
    assert all(c["down_block_additional_residuals"] is not None for c in calls)
    return calls


def livediff_noise(
    bundle: ModelBundle,
    nets: tuple[LoadedControlNet, ...],
    call: dict[str, Any],
    control: torch.Tensor,
    scales: torch.Tensor,
) -> torch.Tensor:
    """livediff's noise for one recorded call; ``control`` [K, 3, H, W], ``scales`` [rows, K]."""
    sample = call["sample"]
    rows = sample.shape[0]
    added = call.get("added_cond_kwargs") or {}
    batch = UNetBatch(
        latents=sample,
        timesteps=call["timestep"].reshape(-1).expand(rows).to(torch.long),
        embeds=call["encoder_hidden_states"],
        text_embeds=added.get("text_embeds"),
        time_ids=added.get("time_ids"),
        control_images=control[None].expand(rows, -1, -1, -1, -1),
        control_scales=scales,
    )
    return bundle.with_controlnets(nets).predict_noise(batch)


def _pipeline(cls: Any, bundle: ModelBundle, controlnet: Any) -> Any:
    parts: dict[str, Any] = {
        "vae": build_full_vae(bundle.preset).eval(),
        "unet": bundle.unet,
        "controlnet": controlnet,
        "scheduler": LCMScheduler.from_config(bundle.scheduler_config),
        "text_encoder": bundle.text_encoders[0],
        "tokenizer": bundle.tokenizers[0],
    }
    if bundle.preset.is_sdxl:
        parts.update(text_encoder_2=bundle.text_encoders[1], tokenizer_2=bundle.tokenizers[1])
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _prompt_kwargs(bundle: ModelBundle) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "prompt_embeds": _embeds(bundle, 10),
        "negative_prompt_embeds": _embeds(bundle, 11),
    }
    if bundle.preset.is_sdxl:
        pooled = bundle.pooled_dim
        assert pooled is not None
        gen = torch.Generator().manual_seed(12)
        kwargs.update(
            pooled_prompt_embeds=torch.randn(1, pooled, generator=gen),
            negative_pooled_prompt_embeds=torch.randn(1, pooled, generator=gen),
        )
    return kwargs


def run_pipeline(
    cls: Any,
    bundle: ModelBundle,
    controlnet: Any,
    control_image: Any,
    scale: float | list[float],
    **extra: Any,
) -> list[dict[str, Any]]:
    pipe = _pipeline(cls, bundle, controlnet)
    kwargs = {
        **_prompt_kwargs(bundle),
        "image": _images(1, 20),
        "control_image": control_image,
        "controlnet_conditioning_scale": scale,
        "strength": 0.75,
        "num_inference_steps": 4,
        "guidance_scale": 2.0,  # classifier-free guidance: two rows, unconditional first
        "height": SIZE,
        "width": SIZE,
        "output_type": "latent",
        "generator": torch.Generator().manual_seed(0),
        **extra,
    }
    return recorded_unet_calls(bundle.unet, lambda: pipe(**kwargs))


CASES = [
    pytest.param((0,), (0.7,), id="one-net"),
    pytest.param((0, 1), (0.6, 1.3), id="two-nets"),
]


@pytest.mark.parametrize(("which", "scales"), CASES)
def test_sd_equals_diffusers_controlnet_img2img_pipeline(
    tiny_bundle: ModelBundle,
    sd_nets: tuple[LoadedControlNet, ...],
    which: tuple[int, ...],
    scales: tuple[float, ...],
) -> None:
    nets = tuple(sd_nets[i] for i in which)
    control = _images(len(nets), 30)
    if len(nets) == 1:
        args: tuple[Any, Any, Any] = (nets[0].net, control[:1], scales[0])
    else:
        args = (MultiControlNetModel([n.net for n in nets]), list(control[:, None]), list(scales))
    calls = run_pipeline(StableDiffusionControlNetImg2ImgPipeline, tiny_bundle, *args)
    assert len(calls) >= 2  # several timesteps
    for call in calls:
        rows = call["sample"].shape[0]
        per_row = torch.tensor(scales).expand(rows, -1)
        ours = livediff_noise(tiny_bundle, nets, call, control, per_row)
        torch.testing.assert_close(ours, call["noise"], atol=ATOL, rtol=0)


@pytest.mark.parametrize(("which", "scales"), CASES)
def test_sdxl_equals_diffusers_controlnet_img2img_pipeline(
    tiny_sdxl_bundle: ModelBundle,
    xl_nets: tuple[LoadedControlNet, ...],
    which: tuple[int, ...],
    scales: tuple[float, ...],
) -> None:
    nets = tuple(xl_nets[i] for i in which)
    control = _images(len(nets), 31)
    if len(nets) == 1:
        args: tuple[Any, Any, Any] = (nets[0].net, control[:1], scales[0])
    else:
        args = (MultiControlNetModel([n.net for n in nets]), list(control[:, None]), list(scales))
    calls = run_pipeline(StableDiffusionXLControlNetImg2ImgPipeline, tiny_sdxl_bundle, *args)
    assert calls[0]["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    for call in calls:
        rows = call["sample"].shape[0]
        per_row = torch.tensor(scales).expand(rows, -1)
        ours = livediff_noise(tiny_sdxl_bundle, nets, call, control, per_row)
        torch.testing.assert_close(ours, call["noise"], atol=ATOL, rtol=0)


def test_sdxl_union_equals_diffusers_union_img2img_pipeline(
    tiny_sdxl_bundle: ModelBundle,
) -> None:
    spec = ControlNetSpec("random", name="union", union=True, control_type="depth", seed=6)
    net = load_controlnet(spec, tiny_sdxl_bundle)
    assert net.is_union and net.control_index == UNION_CONTROL_TYPES["depth"]
    control = _images(1, 32)
    calls = run_pipeline(
        StableDiffusionXLControlNetUnionImg2ImgPipeline,
        tiny_sdxl_bundle,
        net.net,
        [control],
        0.8,
        control_mode=[UNION_CONTROL_TYPES["depth"]],
    )
    for call in calls:
        per_row = torch.full((call["sample"].shape[0], 1), 0.8)
        ours = livediff_noise(tiny_sdxl_bundle, (net,), call, control, per_row)
        torch.testing.assert_close(ours, call["noise"], atol=ATOL, rtol=0)


def test_guess_mode_is_a_zero_scale_on_the_unconditional_rows(tiny_bundle: ModelBundle) -> None:
    """diffusers' guess mode runs the net on the conditional rows only and adds zeros to the
    unconditional ones: per-row scales say the same (0 for the unconditional row)."""
    net = load_controlnet(ControlNetSpec("random", seed=7, guess_mode=True), tiny_bundle)
    control = _images(1, 33)
    calls = run_pipeline(
        StableDiffusionControlNetImg2ImgPipeline,
        tiny_bundle,
        net.net,
        control,
        0.9,
        guess_mode=True,
    )
    for call in calls:
        ours = livediff_noise(tiny_bundle, (net,), call, control, torch.tensor([[0.0], [0.9]]))
        torch.testing.assert_close(ours, call["noise"], atol=ATOL, rtol=0)


# ---------------------------------------------------------------- per-row rules
def _batch(
    bundle: ModelBundle, rows: int, seed: int, control: torch.Tensor | None = None, **kw: Any
) -> UNetBatch:
    gen = torch.Generator().manual_seed(seed)
    seq, dim = bundle.embed_shape
    return UNetBatch(
        latents=torch.randn(rows, 4, SIZE // 8, SIZE // 8, generator=gen),
        timesteps=torch.randint(100, 900, (rows,), generator=gen),
        embeds=torch.randn(rows, seq, dim, generator=gen),
        control_images=control,
        **kw,
    )


def test_per_row_scales_equal_each_row_alone(
    tiny_bundle: ModelBundle, sd_nets: tuple[LoadedControlNet, ...]
) -> None:
    model = tiny_bundle.with_controlnets(sd_nets)
    control = torch.stack([_images(2, 40 + r) for r in range(3)])  # [rows, K, 3, H, W]
    scales = torch.tensor([[0.3, 1.2], [1.5, 0.0], [0.0, 0.8]])
    batch = _batch(tiny_bundle, 3, 1, control, control_scales=scales)
    together = model.predict_noise(batch)
    for row in range(3):
        alone = model.predict_noise(batch.narrow(row, 1))
        torch.testing.assert_close(together[row : row + 1], alone, atol=ATOL, rtol=0)
    # and each scale really is that row's: a changed scale changes only its row
    changed = scales.clone()
    changed[1, 0] = 0.4
    again = model.predict_noise(_rescaled(batch, changed))
    assert not torch.allclose(again[1], together[1], atol=1e-3)
    torch.testing.assert_close(again[[0, 2]], together[[0, 2]], atol=ATOL, rtol=0)


def _rescaled(batch: UNetBatch, scales: torch.Tensor) -> UNetBatch:
    return replace(batch, control_scales=scales)


def test_scale_zero_equals_the_unet_alone(
    tiny_bundle: ModelBundle, sd_nets: tuple[LoadedControlNet, ...]
) -> None:
    model = tiny_bundle.with_controlnets(sd_nets)
    control = torch.stack([_images(2, 50 + r) for r in range(2)])
    batch = _batch(tiny_bundle, 2, 2, control, control_scales=torch.zeros(2, 2))
    plain = _batch(tiny_bundle, 2, 2)
    assert torch.equal(model.predict_noise(batch), tiny_bundle.predict_noise(plain))
    on = model.predict_noise(_rescaled(batch, torch.ones(2, 2)))
    assert (on - tiny_bundle.predict_noise(plain)).abs().amax() > 1e-2  # the nets do something


def test_second_net_at_zero_equals_the_first_alone(
    tiny_bundle: ModelBundle, sd_nets: tuple[LoadedControlNet, ...]
) -> None:
    control = torch.stack([_images(2, 60 + r) for r in range(2)])
    both = tiny_bundle.with_controlnets(sd_nets).predict_noise(
        _batch(tiny_bundle, 2, 3, control, control_scales=torch.tensor([[0.5, 0.0], [1.0, 0.0]]))
    )
    first = tiny_bundle.with_controlnets(sd_nets[:1]).predict_noise(
        _batch(tiny_bundle, 2, 3, control[:, :1], control_scales=torch.tensor([[0.5], [1.0]]))
    )
    torch.testing.assert_close(both, first, atol=ATOL, rtol=0)


def test_batcher_packs_control_fields_and_zeroes_sessions_without(
    tiny_bundle: ModelBundle, sd_nets: tuple[LoadedControlNet, ...]
) -> None:
    """The engine's batcher packs the new fields unchanged; a session that sends none shares
    the call with zero scales, which is its UNet-alone answer."""
    model = tiny_bundle.with_controlnets(sd_nets[:1])
    with_control = _batch(
        tiny_bundle,
        2,
        4,
        torch.stack([_images(1, 70), _images(1, 71)]),
        control_scales=torch.tensor([[0.9], [0.6]]),
    )
    without = _batch(tiny_bundle, 1, 5)
    noise, call = BatchPacker(model, buckets=(4,)).predict([with_control, without])
    assert (call.rows, call.padded_rows) == (3, 4)
    torch.testing.assert_close(noise[0], model.predict_noise(with_control), atol=ATOL, rtol=0)
    torch.testing.assert_close(noise[1], tiny_bundle.predict_noise(without), atol=ATOL, rtol=0)


def test_control_inputs_of_the_wrong_shape_are_refused(
    tiny_bundle: ModelBundle, sd_nets: tuple[LoadedControlNet, ...]
) -> None:
    from livediff.exceptions import BatchCompositionError

    model = tiny_bundle.with_controlnets(sd_nets)
    one_slot = torch.stack([_images(1, 80 + r) for r in range(2)])
    with pytest.raises(BatchCompositionError, match="one slot per loaded ControlNet") as info:
        model.predict_noise(_batch(tiny_bundle, 2, 6, one_slot, control_scales=torch.ones(2, 1)))
    assert info.value.field == "control_images"
    with pytest.raises(BatchCompositionError, match="no ControlNet loaded"):
        tiny_bundle.predict_noise(
            _batch(tiny_bundle, 2, 6, one_slot, control_scales=torch.ones(2, 1))
        )
    with pytest.raises(BatchCompositionError, match="control_scales"):
        model.predict_noise(_batch(tiny_bundle, 2, 6, one_slot.repeat(1, 2, 1, 1, 1)))


# ---------------------------------------------------------------- loading
def test_random_is_the_family_architecture() -> None:
    """``from_unet`` of the preset's UNet: the shape of every net in the README's table."""
    sd21 = family_architecture({**get_preset("sd-turbo").unet_config}, union=False)
    assert sd21["cross_attention_dim"] == 1024
    assert list(sd21["conditioning_embedding_out_channels"]) == [16, 32, 96, 256]
    assert list(sd21["attention_head_dim"]) == [5, 10, 20, 20]
    xl = family_architecture({**get_preset("sdxl-turbo").unet_config}, union=True)
    assert list(xl["transformer_layers_per_block"]) == [1, 2, 10]
    assert (xl["num_control_type"], xl["num_trans_channel"], xl["num_proj_channel"]) == (
        6,
        320,
        320,
    )


def _same_weights(a: Any, b: Any) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for key, value in left.items():
        assert torch.equal(value, right[key]), key


def test_load_from_a_folder(
    tiny_bundle: ModelBundle, sd_nets: tuple[LoadedControlNet, ...], tmp_path: Path
) -> None:
    sd_nets[0].net.save_pretrained(tmp_path / "cn")
    loaded = load_controlnet(ControlNetSpec(str(tmp_path / "cn"), name="mine"), tiny_bundle)
    assert loaded.name == "mine" and not loaded.is_union
    _same_weights(loaded.net, sd_nets[0].net)


def test_load_from_a_single_safetensors_file(
    tiny_bundle: ModelBundle, sd_nets: tuple[LoadedControlNet, ...], tmp_path: Path
) -> None:
    path = tmp_path / "canny.safetensors"
    save_file(sd_nets[1].net.state_dict(), str(path))
    loaded = load_controlnet(ControlNetSpec(str(path)), tiny_bundle)
    assert loaded.name == str(path)
    _same_weights(loaded.net, sd_nets[1].net)


@pytest.mark.parametrize("prefix", ["control_model.", ""])
def test_load_a_single_file_in_the_original_layout(
    tiny_bundle: ModelBundle, sd_nets: tuple[LoadedControlNet, ...], tmp_path: Path, prefix: str
) -> None:
    """ControlNet's own layout (``control_v11p_sd15_canny.pth`` style under ``control_model.``,
    or bare as thibaud's SD 2.1 files), converted by diffusers at load."""
    path = tmp_path / "control_sd15_canny.safetensors"
    checkpoint = controlnet_to_ldm(sd_nets[0].net, prefix=prefix)
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(path))
    loaded = load_controlnet(ControlNetSpec(str(path), name="canny"), tiny_bundle)
    _same_weights(loaded.net, sd_nets[0].net)


def test_a_preset_is_enough_for_a_random_net() -> None:
    net = load_controlnet(ControlNetSpec("random", seed=1), get_preset("tiny"), device="cpu")
    assert net.net.dtype == torch.float32 and net.net.device.type == "cpu"
    assert list(net.net.config.block_out_channels) == [32, 64]


def test_single_file_of_another_shape_names_the_architecture(
    tiny_bundle: ModelBundle, tmp_path: Path
) -> None:
    path = tmp_path / "odd.safetensors"
    save_file({"controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3)}, str(path))
    with pytest.raises(ModelLoadError, match="does not match the ControlNet architecture of tiny"):
        load_controlnet(ControlNetSpec(str(path)), tiny_bundle)


def test_a_controlnet_of_another_family_is_refused_naming_both(
    tiny_bundle: ModelBundle, xl_nets: tuple[LoadedControlNet, ...], tmp_path: Path
) -> None:
    xl_nets[0].net.save_pretrained(tmp_path / "xl")
    with pytest.raises(ModelLoadError) as info:
        load_controlnet(ControlNetSpec(str(tmp_path / "xl"), name="xl-canny"), tiny_bundle)
    assert str(info.value) == (
        "controlnet 'xl-canny' is an SDXL ControlNet; the model tiny is SD 1.5"
    )


def test_family_is_checked_from_the_config_before_any_weights(tmp_path: Path) -> None:
    """A folder with only the config of a full-size SDXL ControlNet, for sd-turbo: refused
    from config.json alone (there are no weights to read)."""
    folder = tmp_path / "controlnet-canny-sdxl-1.0"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "_class_name": "ControlNetModel",
                **family_architecture(get_preset("sdxl-turbo").unet_config, union=False),
            },
            default=list,
        )
    )
    spec = ControlNetSpec(str(folder), name="diffusers/controlnet-canny-sdxl-1.0")
    with pytest.raises(ModelLoadError) as info:
        load_controlnet(spec, get_preset("sd-turbo"), device="cpu")
    assert str(info.value) == (
        "controlnet 'diffusers/controlnet-canny-sdxl-1.0' is an SDXL ControlNet; "
        "the model sd-turbo is SD 2.1"
    )


def test_declared_family_must_be_the_models(tiny_bundle: ModelBundle) -> None:
    with pytest.raises(ModelLoadError, match=r"declared for SDXL; the model tiny is SD 1\.5"):
        load_controlnet(ControlNetSpec("random", family="sdxl"), tiny_bundle)
    with pytest.raises(ParameterError, match="family='sd3'"):
        ControlNetSpec("random", family="sd3")  # type: ignore[arg-type]


def test_union_needs_a_control_type_and_others_refuse_one(
    tiny_sdxl_bundle: ModelBundle, tiny_bundle: ModelBundle
) -> None:
    with pytest.raises(ParameterError, match="union ControlNet: give it a control_type"):
        load_controlnet(ControlNetSpec("random", union=True), tiny_sdxl_bundle)
    with pytest.raises(ParameterError, match="not a union ControlNet") as info:
        load_controlnet(ControlNetSpec("random", control_type="canny"), tiny_bundle)
    assert info.value.field == "control_type"
    with pytest.raises(ParameterError, match="is not one of the 6 modes"):
        load_controlnet(ControlNetSpec("random", union=True, control_type=7), tiny_sdxl_bundle)
    with pytest.raises(ParameterError, match="unknown union control_type 'pose'"):
        ControlNetSpec("random", union=True, control_type="pose")


def test_uncached_hf_id_offline_says_what_and_where(
    tiny_bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert hf_constants.HF_HUB_OFFLINE, "conftest turns HF_HUB_OFFLINE on for the whole run"
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotAvailableError) as info:
        load_controlnet(ControlNetSpec("lllyasviel/control_v11p_sd15_canny"), tiny_bundle)
    message = str(info.value)
    assert "'lllyasviel/control_v11p_sd15_canny'" in message
    assert str(tmp_path) in message
    assert "HF_HUB_OFFLINE" in message
    assert "source 'random'" in message


def test_tensorrt_refuses_controlnets_clearly(
    tiny_bundle: ModelBundle, sd_nets: tuple[LoadedControlNet, ...]
) -> None:
    with pytest.raises(BackendError, match="ControlNet"):
        load_tensorrt_bundle(tiny_bundle.with_controlnets(sd_nets[:1]))


def test_random_nets_are_seeded(tiny_bundle: ModelBundle) -> None:
    again = load_controlnet(ControlNetSpec("random", seed=1), tiny_bundle)
    other = load_controlnet(ControlNetSpec("random", seed=9), tiny_bundle)
    first = load_controlnet(ControlNetSpec("random", seed=1), tiny_bundle)
    _same_weights(again.net, first.net)
    assert isinstance(other.net, ControlNetModel)
    assert not torch.equal(
        other.net.controlnet_mid_block.weight, first.net.controlnet_mid_block.weight
    )
    assert first.net.controlnet_mid_block.weight.abs().sum() > 0  # zero convs are random too


def test_the_speed_recipe_applies_to_controlnets() -> None:
    """SDPA, fused QKV and channels-last on the UNet and its ControlNets: same answer."""
    from livediff.models.loading import ModelSpec, load_model
    from livediff.models.recipe import Recipe, apply_recipe

    bundle = load_model(ModelSpec(preset="tiny", weights="random"), device="cpu", dtype="fp32")
    model = bundle.with_controlnets([load_controlnet(ControlNetSpec("random", seed=1), bundle)])
    batch = _batch(bundle, 2, 9, _images(2, 90)[:, None], control_scales=torch.ones(2, 1))
    before = model.predict_noise(batch)
    apply_recipe(model, Recipe(compile=False))
    net = model.controlnets[0].net
    assert {type(p).__name__ for p in net.attn_processors.values()} == {"FusedAttnProcessor2_0"}
    assert any(getattr(m, "fused_projections", False) for m in net.modules())
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model.predict_noise(batch), before, atol=ATOL, rtol=0)
