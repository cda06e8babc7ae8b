"""Loading a single LDM-layout checkpoint (``--source model.safetensors --config-source DIR|HF_ID``).

The checkpoint is written from the tiny model's diffusers folder by
:mod:`helpers.ldm_checkpoint`, so the folder and the file hold the same weights and must give
the same model, bit for bit. A second checkpoint from different weights proves the file's
weights are the ones used, not the config folder's.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES
from huggingface_hub import constants as hf_constants
from safetensors import safe_open

import helpers.ldm_checkpoint as ldm
from helpers.ldm_checkpoint import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, save_ldm_checkpoint
from livediff.engine.config import StreamConfig
from livediff.engine.stream import Stream
from livediff.exceptions import ModelLoadError, ModelNotAvailableError, ParameterError
from livediff.models.architectures import build_text_encoder
from livediff.models.bundle import ModelBundle
from livediff.models.export import export_model
from livediff.models.loading import ModelSpec, load_model
from livediff.models.presets import get_preset

SMALL = StreamConfig(width=64, height=64)  # the smallest size: these tests are about weights
FRAMES = 4
STEPS = 2  # two denoising steps: the Stream Batch delay and both UNet rows are exercised


@pytest.fixture(scope="module")
def ldm_file(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's own weights as one LDM-layout ``model.safetensors``."""
    return save_ldm_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("ldm") / "model.safetensors")


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny architecture with other weights (seed 2, ``tiny_model_dir`` is seed 1)."""
    return export_model(
        ModelSpec(preset="tiny", weights="random", seed=2),
        tmp_path_factory.mktemp("tiny2") / "model",
    )


def _load(source: Path, config_source: Path | str | None = None, vae: str = "tiny") -> ModelBundle:
    spec = ModelSpec(
        preset="tiny",
        source=str(source),
        config_source=None if config_source is None else str(config_source),
        vae=vae,
    )
    return load_model(spec, device="cpu", dtype="fp32")


def _stream_images(bundle: ModelBundle) -> torch.Tensor:
    """uint8 outputs of a two-step img2img stream over a few seeded random frames."""
    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (FRAMES, 96, 80, 3), generator=generator, dtype=torch.uint8)
    stream = Stream(bundle, SMALL, prompt="a watercolor painting", steps=STEPS, strength=0.6)
    outputs = [out for frame in frames for out in stream.process(frame)] + stream.flush()
    assert [out.index for out in outputs] == list(range(FRAMES))
    return torch.stack([out.image for out in outputs])


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key


def _assert_weights_differ(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert any(not torch.equal(sd_a[key], sd_b[key]) for key in sd_a)


def test_checkpoint_has_the_ldm_layout(ldm_file: Path) -> None:
    with safe_open(str(ldm_file), "pt") as f:
        keys = set(f.keys())
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    # a few names every SD1.5 single-file loader looks for
    assert UNET_PREFIX + "input_blocks.0.0.weight" in keys
    assert UNET_PREFIX + "time_embed.0.weight" in keys
    assert UNET_PREFIX + "middle_block.1.proj_in.weight" in keys
    assert VAE_PREFIX + "encoder.mid.attn_1.q.weight" in keys
    assert CLIP_PREFIX + "text_model.embeddings.position_embedding.weight" in keys
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in keys)


@pytest.mark.parametrize("vae", ["tiny", "full"])
def test_single_file_loads_the_same_model_as_the_folder(
    tiny_model_dir: Path, ldm_file: Path, vae: str
) -> None:
    from_folder = _load(tiny_model_dir, vae=vae)
    from_file = _load(ldm_file, config_source=tiny_model_dir, vae=vae)

    assert from_file.source == str(ldm_file)
    assert type(from_file.vae) is type(from_folder.vae)
    assert type(from_file.vae).__name__ == ("AutoencoderTiny" if vae == "tiny" else "AutoencoderKL")
    _assert_same_weights(from_file.unet, from_folder.unet)
    _assert_same_weights(from_file.text_encoders[0], from_folder.text_encoders[0])
    _assert_same_weights(from_file.vae, from_folder.vae)
    assert from_file.scheduler_config == from_folder.scheduler_config
    prompt = "a watercolor painting"
    assert from_file.tokenizers[0](prompt).input_ids == from_folder.tokenizers[0](prompt).input_ids
    # same weights, same CPU kernels, same seeds: bit-identical frames
    images = _stream_images(from_folder)
    assert torch.equal(_stream_images(from_file), images)
    assert images.float().std() > 0  # frames that carry an image, not a constant


@pytest.mark.parametrize("vae", ["tiny", "full"])
def test_single_file_weights_win_over_the_config_folder(
    tiny_model_dir: Path, other_model_dir: Path, tmp_path: Path, vae: str
) -> None:
    """The config folder has weights too; the networks must come from the file all the same."""
    other_file = save_ldm_checkpoint(other_model_dir, tmp_path / "other.safetensors")
    from_file = _load(other_file, config_source=tiny_model_dir, vae=vae)
    expected = _load(other_model_dir, vae="full")
    config_folder = _load(tiny_model_dir, vae="full")

    _assert_same_weights(from_file.unet, expected.unet)
    _assert_same_weights(from_file.text_encoders[0], expected.text_encoders[0])
    _assert_weights_differ(from_file.unet, config_folder.unet)
    _assert_weights_differ(from_file.text_encoders[0], config_folder.text_encoders[0])
    if vae == "full":
        _assert_same_weights(from_file.vae, expected.vae)
        _assert_weights_differ(from_file.vae, config_folder.vae)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private, empty HF cache (read offline: conftest sets HF_HUB_OFFLINE)."""
    assert hf_constants.HF_HUB_OFFLINE
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


def _put_in_hf_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """Lay ``folder`` out in ``cache`` the way a download of ``repo_id`` would."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_config_source_may_be_a_cached_hf_id(
    tiny_model_dir: Path, ldm_file: Path, hf_cache: Path
) -> None:
    """What users run: ``--source model.safetensors --config-source org/model``."""
    _put_in_hf_cache(hf_cache, "livediff-tests/tiny-sd", tiny_model_dir)
    from_file = _load(ldm_file, config_source="livediff-tests/tiny-sd", vae="full")
    from_folder = _load(tiny_model_dir, vae="full")
    _assert_same_weights(from_file.unet, from_folder.unet)
    _assert_same_weights(from_file.text_encoders[0], from_folder.text_encoders[0])
    _assert_same_weights(from_file.vae, from_folder.vae)
    assert from_file.scheduler_config == from_folder.scheduler_config


def test_uncached_hf_config_names_the_config_and_the_checkpoint(
    ldm_file: Path, hf_cache: Path
) -> None:
    config_id = "livediff-tests/not-a-cached-config"
    with pytest.raises(ModelNotAvailableError) as info:
        _load(ldm_file, config_source=config_id)
    message = str(info.value)
    assert config_id in message
    assert ldm_file.name in message
    assert str(hf_cache) in message
    assert "--weights random" in message


@pytest.mark.parametrize("config", ["folder", "hf-id"])
def test_truncated_checkpoint_is_a_load_error_not_a_missing_config(
    tiny_model_dir: Path, ldm_file: Path, hf_cache: Path, tmp_path: Path, config: str
) -> None:
    """An interrupted download must not be reported as an uncached config."""
    _put_in_hf_cache(hf_cache, "livediff-tests/tiny-sd", tiny_model_dir)
    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes(ldm_file.read_bytes()[: ldm_file.stat().st_size // 2])
    config_source = tiny_model_dir if config == "folder" else "livediff-tests/tiny-sd"
    with pytest.raises(ModelLoadError, match=re.escape(str(truncated))) as info:
        _load(truncated, config_source=config_source)
    assert not isinstance(info.value, ModelNotAvailableError)


def test_missing_checkpoint_file_names_the_path(tiny_model_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.safetensors"
    with pytest.raises(ModelLoadError, match=re.escape(str(missing))):
        _load(missing, config_source=tiny_model_dir)


def test_single_file_without_config_source_is_refused(ldm_file: Path) -> None:
    # the tiny preset has no HF id to borrow an architecture from
    with pytest.raises(ParameterError, match="config_source"):
        _load(ldm_file)


# ---------------------------------------------------------------- the converter itself
def _sd_unet(levels: int, layers_per_block: int) -> UNet2DConditionModel:
    """SD1.5's block pattern (attention everywhere but the lowest level) at toy width."""
    return UNet2DConditionModel(
        block_out_channels=[32] * levels,
        down_block_types=["CrossAttnDownBlock2D"] * (levels - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (levels - 1),
        layers_per_block=layers_per_block,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def _sdxl_like_unet() -> UNet2DConditionModel:
    """SDXL's pattern: no attention at the top level, deeper transformers, text_time conditioning."""
    return UNet2DConditionModel(
        block_out_channels=[32, 64, 64],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        layers_per_block=2,
        transformer_layers_per_block=[1, 2, 2],
        use_linear_projection=True,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )


def _vae(levels: int, layers_per_block: int) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[8] * levels,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        layers_per_block=layers_per_block,
        norm_num_groups=8,
    )


def _text_encoder() -> torch.nn.Module:
    return build_text_encoder(get_preset("tiny").text_configs[0], with_projection=False)


@pytest.mark.parametrize(("levels", "layers_per_block"), [(2, 1), (3, 2), (4, 2), (4, 3)], ids=str)
def test_converter_round_trips_sd_shaped_models(levels: int, layers_per_block: int) -> None:
    unet, vae, text_encoder = (
        _sd_unet(levels, layers_per_block),
        _vae(levels, layers_per_block),
        _text_encoder(),
    )
    checkpoint = ldm.pipeline_to_ldm(unet, text_encoder, vae)  # checks itself; raises if lossy
    networks = (unet, vae, text_encoder)
    assert len(checkpoint) == sum(len(network.state_dict()) for network in networks)


def test_converter_round_trips_an_sdxl_shaped_unet() -> None:
    checkpoint = ldm.pipeline_to_ldm(_sdxl_like_unet(), _text_encoder(), _vae(3, 2))
    assert UNET_PREFIX + "label_emb.0.0.weight" in checkpoint


def test_converter_writes_the_sd15_names() -> None:
    """The names of the real v1-5 checkpoint, where diffusers' round trip would accept others."""
    checkpoint = ldm.pipeline_to_ldm(_sd_unet(4, 2), _text_encoder(), _vae(4, 2))
    unet = {k.removeprefix(UNET_PREFIX) for k in checkpoint if k.startswith(UNET_PREFIX)}
    assert CHECKPOINT_KEY_NAMES["v1"] in checkpoint
    assert CHECKPOINT_KEY_NAMES["v2"] in checkpoint
    assert {f"input_blocks.{i}.0.op.weight" for i in (3, 6, 9)} <= unet
    # upsamplers follow the attention when a level has one: slot 2, else slot 1
    assert {"output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight"} <= unet
    assert "output_blocks.8.2.conv.weight" in unet
    assert {k.split(".")[1] for k in unet if k.startswith("input_blocks.")} == {
        str(i) for i in range(12)
    }
    assert {k.split(".")[1] for k in unet if k.startswith("output_blocks.")} == {
        str(i) for i in range(12)
    }
    assert checkpoint[VAE_PREFIX + "encoder.mid.attn_1.q.weight"].dim() == 4  # a 1×1 conv in LDM
    # LDM numbers decoder levels from the lowest resolution: level 0 has no upsampler
    assert VAE_PREFIX + "decoder.up.3.upsample.conv.weight" in checkpoint
    assert not any(k.startswith(VAE_PREFIX + "decoder.up.0.upsample") for k in checkpoint)
    assert not any(k.startswith(VAE_PREFIX + "encoder.down.3.downsample") for k in checkpoint)


def test_converter_fails_loudly_on_a_wrong_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    swapped = {**ldm._UNET_RESNET, "conv1": "out_layers.3", "conv2": "in_layers.2"}
    monkeypatch.setattr(ldm, "_UNET_RESNET", swapped)
    with pytest.raises(ldm.ConversionError, match="round trip"):
        ldm.pipeline_to_ldm(_sd_unet(2, 1), _text_encoder(), _vae(2, 1))
