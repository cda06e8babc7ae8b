"""ONNX export of the UNet and VAE halves (run in onnxruntime against eager PyTorch on CPU),
and the TensorRT engine cache key (StreamDiffusion #152: resolution and LoRA must be in it)."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from livediff.exceptions import BackendError, ParameterError
from livediff.models.backends import Backend, prepare_backend
from livediff.models.bundle import ModelBundle
from livediff.models.loading import ModelSpec, load_model
from livediff.models.onnx_export import OPSET, GraphName, OnnxGraph, export_graph, export_graphs
from livediff.models.presets import LoraRef
from livediff.models.trt_cache_key import EngineKey, EngineProfile, engine_key, profile_shapes
from livediff.models.unet_batch import UNetBatch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# Both sides run fp32 on the CPU; they differ only in kernel choice and summation order
# (observed max |diff| ~2e-6 on outputs of magnitude ~1). A wrong scaling factor, timestep,
# conditioning input or swapped height/width is an O(1) error, far outside this.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
# (rows, latent height, latent width): two batch sizes, a square and a non-square size, and a
# size off the tiny UNet's ×2 upsampling grid (the traced graph must follow eager there too).
UNET_CASES = [(1, 16, 16), (3, 24, 40), (2, 9, 13)]
VAE_CASES = [(1, 16, 16), (3, 24, 40)]


def _session(graph: OnnxGraph) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(graph.path), options, providers=["CPUExecutionProvider"])


def _run(graph: OnnxGraph, *inputs: torch.Tensor) -> torch.Tensor:
    feed = {name: t.numpy() for name, t in zip(graph.inputs, inputs, strict=True)}
    (output,) = _session(graph).run(list(graph.outputs), feed)
    return torch.from_numpy(output)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _unet_inputs(bundle: ModelBundle, rows: int, h: int, w: int) -> list[torch.Tensor]:
    seq, dim = bundle.embed_shape
    timesteps = torch.linspace(999, 1, rows).long()
    inputs = [_randn(rows, 4, h, w), timesteps, _randn(rows, seq, dim, seed=1)]
    if bundle.pooled_dim:
        inputs += [_randn(rows, bundle.pooled_dim, seed=2), _randn(rows, 6, seed=3).abs() * 512]
    return inputs


@pytest.fixture(scope="module")
def graphs(
    tiny_bundle: ModelBundle, tmp_path_factory: pytest.TempPathFactory
) -> dict[GraphName, OnnxGraph]:
    return export_graphs(tiny_bundle, tmp_path_factory.mktemp("onnx"))


def test_graphs_follow_the_naming_contract(graphs: dict[GraphName, OnnxGraph]) -> None:
    expected = {
        GraphName.UNET: (
            ["sample", "timestep", "encoder_hidden_states"],
            ["noise_pred"],
            {"sample": ["batch", 4, "latent_height", "latent_width"], "timestep": ["batch"]},
        ),
        GraphName.VAE_ENCODER: (
            ["images"],
            ["latents"],
            {"images": ["batch", 3, "image_height", "image_width"]},
        ),
        GraphName.VAE_DECODER: (
            ["latents"],
            ["images"],
            {"latents": ["batch", 4, "latent_height", "latent_width"]},
        ),
    }
    for name, (inputs, outputs, dims) in expected.items():
        model = onnx.load(str(graphs[name].path))
        assert [i.name for i in model.graph.input] == inputs == list(graphs[name].inputs)
        assert [o.name for o in model.graph.output] == outputs == list(graphs[name].outputs)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= OPSET
        for value in model.graph.input:
            if value.name in dims:
                shape = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
                assert shape == dims[value.name]
    timestep = onnx.load(str(graphs[GraphName.UNET].path)).graph.input[1]
    assert timestep.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@pytest.mark.parametrize(("rows", "h", "w"), UNET_CASES)
def test_unet_matches_eager(
    tiny_bundle: ModelBundle, graphs: dict[GraphName, OnnxGraph], rows: int, h: int, w: int
) -> None:
    inputs = _unet_inputs(tiny_bundle, rows, h, w)
    expected = ModelBundle.predict_noise(tiny_bundle, UNetBatch(*inputs))
    onnx_inputs = [inputs[0], inputs[1].float(), *inputs[2:]]
    actual = _run(graphs[GraphName.UNET], *onnx_inputs)
    assert actual.shape == (rows, 4, h, w)
    torch.testing.assert_close(actual, expected, **TOLERANCE)


@pytest.mark.parametrize(("rows", "h", "w"), VAE_CASES)
def test_vae_halves_match_eager(
    tiny_bundle: ModelBundle, graphs: dict[GraphName, OnnxGraph], rows: int, h: int, w: int
) -> None:
    images = _randn(rows, 3, 8 * h, 8 * w).clamp(-1, 1)
    latents = _run(graphs[GraphName.VAE_ENCODER], images)
    assert latents.shape == (rows, 4, h, w)
    torch.testing.assert_close(latents, tiny_bundle.encode(images), **TOLERANCE)
    decoded = _run(graphs[GraphName.VAE_DECODER], latents)
    assert decoded.shape == (rows, 3, 8 * h, 8 * w)
    torch.testing.assert_close(decoded, tiny_bundle.decode(latents), **TOLERANCE)


def test_full_vae_halves_match_eager(tmp_path: Path) -> None:
    """The checkpoint's own VAE (AutoencoderKL): its latent mean, and a scaling factor ≠ 1."""
    spec = ModelSpec(preset="tiny", weights="random", vae="full")
    bundle = load_model(spec, device="cpu", dtype="fp32")
    assert bundle.scaling_factor != 1.0  # TAESD's is 1, so only this VAE checks the scaling
    encoder, decoder = export_graphs(
        bundle, tmp_path, graphs=(GraphName.VAE_ENCODER, GraphName.VAE_DECODER)
    ).values()
    rows, h, w = VAE_CASES[1]
    images = _randn(rows, 3, 8 * h, 8 * w).clamp(-1, 1)
    latents = _run(encoder, images)
    torch.testing.assert_close(latents, bundle.encode(images), **TOLERANCE)
    torch.testing.assert_close(_run(decoder, latents), bundle.decode(latents), **TOLERANCE)


def test_sdxl_unet_takes_added_conditioning(tmp_path: Path, tiny_sdxl_bundle: ModelBundle) -> None:
    bundle = tiny_sdxl_bundle
    graph = export_graph(bundle, GraphName.UNET, tmp_path)
    assert graph.inputs[-2:] == ("text_embeds", "time_ids")
    for rows, h, w in UNET_CASES[:2]:
        inputs = _unet_inputs(bundle, rows, h, w)
        expected = ModelBundle.predict_noise(bundle, UNetBatch(*inputs))
        actual = _run(graph, inputs[0], inputs[1].float(), *inputs[2:])
        torch.testing.assert_close(actual, expected, **TOLERANCE)
    # The added conditioning is live in the graph, not folded away at export.
    inputs = _unet_inputs(bundle, 1, 16, 16)
    changed = [*inputs[:4], inputs[4] + 64]
    first = _run(graph, inputs[0], inputs[1].float(), *inputs[2:])
    second = _run(graph, changed[0], changed[1].float(), *changed[2:])
    assert (first - second).abs().max() > 1e-3


def test_export_refuses_what_the_contract_does_not_cover(
    tiny_bundle: ModelBundle, tmp_path: Path
) -> None:
    with pytest.raises(ParameterError, match="opset"):
        export_graph(tiny_bundle, GraphName.UNET, tmp_path, opset=OPSET - 1)
    half = dataclasses.replace(tiny_bundle, dtype=torch.bfloat16)
    with pytest.raises(ParameterError, match="fp16 and fp32"):
        export_graph(half, GraphName.UNET, tmp_path)


# ---------------------------------------------------------------- profile and cache key
def test_default_profile_is_batch_1_to_16_and_384_to_1024_px(tiny_bundle: ModelBundle) -> None:
    profile = EngineProfile()
    assert profile.latent_side == (48, 64, 128)
    assert profile_shapes(tiny_bundle, GraphName.UNET, profile) == {
        "sample": ((1, 4, 48, 48), (4, 4, 64, 64), (16, 4, 128, 128)),
        "timestep": ((1,), (4,), (16,)),
        "encoder_hidden_states": ((1, 77, 32), (4, 77, 32), (16, 77, 32)),
    }
    assert profile_shapes(tiny_bundle, GraphName.VAE_ENCODER, profile) == {
        "images": ((1, 3, 384, 384), (4, 3, 512, 512), (16, 3, 1024, 1024))
    }
    assert profile_shapes(tiny_bundle, GraphName.VAE_DECODER, profile)["latents"][2] == (
        16,
        4,
        128,
        128,
    )
    assert profile.covers(16, 384, 1024) and not profile.covers(17, 512, 512)
    assert not profile.covers(1, 256, 512)


def test_sdxl_profile_adds_its_conditioning(tiny_sdxl_bundle: ModelBundle) -> None:
    shapes = profile_shapes(tiny_sdxl_bundle, GraphName.UNET, EngineProfile())
    assert shapes["text_embeds"] == ((1, 32), (4, 32), (16, 32))
    assert shapes["time_ids"] == ((1, 6), (4, 6), (16, 6))


@pytest.mark.parametrize(
    "ranges",
    [
        {"batch": (0, 4, 16)},
        {"batch": (4, 2, 16)},
        {"side": (384, 516, 1024)},  # not a multiple of 8
        {"side": (32, 512, 1024)},
        {"side": (512, 512)},
    ],
)
def test_profile_refuses_bad_ranges(ranges: dict) -> None:
    with pytest.raises(ParameterError):
        EngineProfile(**ranges)


def _key(bundle: ModelBundle, graph: GraphName = GraphName.UNET) -> EngineKey:
    profile = EngineProfile()
    return engine_key(bundle, graph, profile, tensorrt_version="10.3.0", compute_capability=(9, 0))


@pytest.fixture(scope="module")
def base_key(tiny_bundle: ModelBundle) -> EngineKey:
    return _key(tiny_bundle)


@pytest.mark.parametrize(
    "change",
    [
        {"profile": EngineProfile(side=(256, 512, 1024))},  # resolution range (#152)
        {"profile": EngineProfile(side=(384, 512, 768))},
        {"profile": EngineProfile(batch=(1, 4, 8))},  # batch range
        {"dtype": "fp16"},
        {"tensorrt_version": "10.4.0"},
        {"compute_capability": (8, 9)},
        {"graph": "vae_decoder"},
        {"export_version": 2},
    ],
    ids=lambda change: next(iter(change)),
)
def test_key_changes_with_each_field(base_key: EngineKey, change: dict) -> None:
    changed = dataclasses.replace(base_key, **change)
    assert changed.digest() != base_key.digest()
    assert changed.filename != base_key.filename


def test_key_is_equal_for_identical_inputs(tiny_bundle: ModelBundle, base_key: EngineKey) -> None:
    again = load_model(ModelSpec(preset="tiny", weights="random"), device="cpu", dtype="fp32")
    assert _key(again) == base_key
    assert _key(again).digest() == base_key.digest()
    assert _key(again).filename == base_key.filename


def test_key_changes_with_weights(base_key: EngineKey) -> None:
    other = load_model(
        ModelSpec(preset="tiny", weights="random", seed=7), device="cpu", dtype="fp32"
    )
    assert _key(other).weights != base_key.weights
    assert _key(other).digest() != base_key.digest()


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-4 attention LoRA for the tiny UNet, in diffusers' LoRA format."""
    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]))
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: the LoRA would be a no-op
                param.copy_(0.2 * _randn(*param.shape, seed=4))
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), safe_serialization=True
    )
    return folder


def _load(model_dir: Path, *loras: LoraRef) -> ModelBundle:
    spec = ModelSpec(preset="tiny", source=str(model_dir), loras=loras)
    return load_model(spec, device="cpu", dtype="fp32")


def test_key_changes_with_lora_and_its_scale(
    tiny_model_dir: Path, lora_dir: Path, tmp_path: Path
) -> None:
    """StreamDiffusion #152: its key has no LoRA, so a second LoRA reused the first's engine."""
    plain, full, half = (
        _load(tiny_model_dir),
        _load(tiny_model_dir, LoraRef(str(lora_dir), 1.0)),
        _load(tiny_model_dir, LoraRef(str(lora_dir), 0.5)),
    )
    unet_keys = {_key(b).digest() for b in (plain, full, half)}
    assert len(unet_keys) == 3
    assert _key(_load(tiny_model_dir, LoraRef(str(lora_dir), 1.0))) == _key(full)
    # The LoRA touches only the UNet: the VAE engines stay shared.
    vae = {_key(b, GraphName.VAE_DECODER) for b in (plain, full)}
    assert len(vae) == 1
    # The same weights in another folder are the same engine: the path is not in the key.
    moved = shutil.copytree(tiny_model_dir, tmp_path / "moved")
    assert _key(_load(moved)) == _key(plain)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is here")
def test_tensorrt_backend_without_tensorrt_says_how_to_install(tiny_bundle: ModelBundle) -> None:
    with pytest.raises(BackendError, match=r"pip install 'livediff\[tensorrt\]'"):
        prepare_backend(tiny_bundle, Backend.TENSORRT)


def test_tensorrt_backend_refuses_a_cpu_model_at_start_up(
    tiny_bundle: ModelBundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # "installed"
    with pytest.raises(BackendError, match="needs a CUDA device"):
        prepare_backend(tiny_bundle, Backend.TENSORRT)
