"""Where weights come from: the HF cache (offline), and LoRAs fused at load.

Single-file checkpoints have their own module, ``test_single_file.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import constants as hf_constants
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from livediff.engine.config import StreamConfig
from livediff.engine.stream import Stream
from livediff.exceptions import ModelNotAvailableError
from livediff.models.bundle import ModelBundle
from livediff.models.loading import ModelSpec, load_model
from livediff.models.presets import LoraRef

LORA_RANK = 4
LORA_ALPHA = 8  # alpha / rank = 2, so a wrong scaling convention shows up
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SMALL = StreamConfig(width=64, height=64)  # the smallest size: these tests are about weights
FRAMES = 3


# ---------------------------------------------------------------- HF cache, offline
@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF cache for this test, so nothing a developer has downloaded can be found."""
    assert hf_constants.HF_HUB_OFFLINE, "conftest turns HF_HUB_OFFLINE on for the whole run"
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize(
    ("preset", "source", "model_id"),
    [
        ("sd-turbo", None, "stabilityai/sd-turbo"),  # the preset's own HF id
        ("tiny", "livediff-tests/not-a-cached-model", "livediff-tests/not-a-cached-model"),
    ],
)
def test_uncached_hf_id_offline_says_what_and_where(
    empty_hf_cache: Path, preset: str, source: str | None, model_id: str
) -> None:
    with pytest.raises(ModelNotAvailableError) as info:
        load_model(ModelSpec(preset=preset, source=source), device="cpu", dtype="fp32")
    message = str(info.value)
    assert model_id in message
    assert str(empty_hf_cache) in message
    assert "--weights random" in message
    assert "HF_HUB_OFFLINE" in message


# ---------------------------------------------------------------- LoRA
@pytest.fixture(scope="module")
def lora(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, torch.Tensor]]:
    """A rank-4 attention LoRA for the tiny UNet, saved in diffusers' LoRA format.

    Returns the folder (holding ``pytorch_lora_weights.safetensors``) and the peft state dict.
    """
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    unet.add_adapter(
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(LORA_TARGETS))
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero, which would make the LoRA a no-op
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    layers = get_peft_model_state_dict(unet)
    folder = tmp_path_factory.mktemp("lora")
    # the metadata carries lora_alpha; without it a diffusers-format LoRA is read as alpha = rank
    metadata = unet.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=metadata,
        safe_serialization=True,
    )
    return folder, {k: v.detach().clone() for k, v in layers.items()}


def _load(model_dir: Path, *loras: LoraRef) -> ModelBundle:
    return load_model(
        ModelSpec(preset="tiny", source=str(model_dir), loras=loras), device="cpu", dtype="fp32"
    )


def _stream_images(bundle: ModelBundle) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (FRAMES, 64, 64, 3), generator=generator, dtype=torch.uint8)
    stream = Stream(bundle, SMALL, prompt="a watercolor painting", steps=2, strength=0.6)
    outputs = [out for frame in frames for out in stream.process(frame)] + stream.flush()
    return torch.stack([out.image for out in outputs])


def _expected_fused(
    base: dict[str, torch.Tensor], layers: dict[str, torch.Tensor], scale: float
) -> dict[str, torch.Tensor]:
    """W + scale · (alpha / r) · B @ A for every targeted layer; every other tensor unchanged."""
    expected = dict(base)
    for key in layers:
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            delta = layers[f"{module}.lora_B.weight"] @ layers[key]
            expected[f"{module}.weight"] = (
                base[f"{module}.weight"] + scale * (LORA_ALPHA / LORA_RANK) * delta
            )
    return expected


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "file"])
def test_fused_lora_changes_exactly_the_targeted_weights(
    tiny_model_dir: Path, lora: tuple[Path, dict[str, torch.Tensor]], scale: float, as_file: bool
) -> None:
    folder, layers = lora
    source = folder / "pytorch_lora_weights.safetensors" if as_file else folder
    base = _load(tiny_model_dir).unet.state_dict()
    fused = _load(tiny_model_dir, LoraRef(str(source), scale)).unet.state_dict()

    assert fused.keys() == base.keys()
    expected = _expected_fused(base, layers, scale)
    changed = {k for k in base if not torch.equal(fused[k], base[k])}
    assert changed == {k for k in base if expected[k] is not base[k]}
    assert len(changed) == len(layers) // 2
    for key in changed:
        torch.testing.assert_close(fused[key], expected[key])


def test_fused_lora_leaves_no_lora_layers(
    tiny_model_dir: Path, lora: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    unet = _load(tiny_model_dir, LoraRef(str(lora[0]), 1.0)).unet
    assert not [name for name, _ in unet.named_parameters() if "lora" in name]
    assert not [
        name
        for name, module in unet.named_modules()
        if "lora" in name or isinstance(module, BaseTunerLayer)
    ]
    assert not getattr(unet, "peft_config", None)


def test_fused_lora_changes_the_stream_output(
    tiny_model_dir: Path, lora: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    plain = _stream_images(_load(tiny_model_dir))
    with_lora = _stream_images(_load(tiny_model_dir, LoraRef(str(lora[0]), 1.0)))
    assert plain.shape == with_lora.shape == (FRAMES, 64, 64, 3)
    # the random tiny VAE decodes to dim, low-contrast frames, so a changed UNet moves few
    # pixels by much; with this LoRA about a fifth of them change
    changed = (plain != with_lora).float().mean().item()
    assert changed > 0.05, f"only {changed:.1%} of the pixels changed"


def test_lora_at_scale_zero_is_the_plain_model(
    tiny_model_dir: Path, lora: tuple[Path, dict[str, torch.Tensor]]
) -> None:
    base = _load(tiny_model_dir).unet.state_dict()
    fused = _load(tiny_model_dir, LoraRef(str(lora[0]), 0.0)).unet.state_dict()
    assert fused.keys() == base.keys()
    for key in base:
        torch.testing.assert_close(
            fused[key], base[key], rtol=0, atol=1e-7, msg=lambda m, key=key: f"{key}: {m}"
        )


def test_not_cached_lora_offline_names_it(tiny_model_dir: Path, empty_hf_cache: Path) -> None:
    lora_id = "livediff-tests/not-a-cached-lora"
    with pytest.raises(ModelNotAvailableError, match=re.escape(lora_id)):
        _load(tiny_model_dir, LoraRef(lora_id, 1.0))
