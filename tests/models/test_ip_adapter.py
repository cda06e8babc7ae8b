"""IP-Adapter at the model level: livediff's per-row UNet call against diffusers' own IP-Adapter path.

The oracle is diffusers itself on tiny random models, fp32 on the CPU: a pipeline loads the
same h94-layout files with ``load_ip_adapter`` (its image encoder and feature extractor
included), ``prepare_ip_adapter_image_embeds`` encodes the image, ``set_ip_adapter_scale``
sets the scale and its UNet predicts the noise for one row. livediff's one call over a batch
whose rows carry different images and scales must give each row that answer; a row with
scale 0 must give exactly the plain UNet's.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from huggingface_hub import constants as hf_constants
from PIL import Image

from helpers.ip_adapter_files import plain_state_dict, save_adapter, tiny_encoder, write_h94_folder
from livediff.engine.batch_packing import BatchPacker
from livediff.exceptions import (
    BackendError,
    BatchCompositionError,
    FrameTooLargeError,
    InvalidFrameError,
    ModelLoadError,
    ModelNotAvailableError,
    ParameterError,
)
from livediff.models.bundle import ModelBundle
from livediff.models.image_prompts import ImagePrompt, ImagePromptEncoder, row_inputs
from livediff.models.ip_adapter import LoadedIPAdapter
from livediff.models.ip_adapter_loading import TINY_ENCODER, load_ip_adapter
from livediff.models.ip_adapter_spec import IPAdapterSpec, IPAdapterVariant
from livediff.models.presets import get_preset
from livediff.models.recipe import Recipe, apply_recipe
from livediff.models.tensorrt_engine import load_tensorrt_bundle
from livediff.models.unet_batch import UNetBatch

ATOL = 1e-5
WEIGHT_NAMES = {
    (False, "plain"): ("models", "ip-adapter_sd15.safetensors"),
    (False, "plus"): ("models", "ip-adapter-plus_sd15.bin"),
    (True, "plain"): ("sdxl_models", "ip-adapter_sdxl.safetensors"),
    (True, "plus"): ("sdxl_models", "ip-adapter-plus_sdxl_vit-h.safetensors"),
}


def _copy(bundle: ModelBundle) -> ModelBundle:
    """The bundle with its own UNet (installing an adapter must not touch the shared one)."""
    return dataclasses.replace(bundle, unet=copy.deepcopy(bundle.unet))


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: ModelBundle) -> Path:
    return write_h94_folder(tmp_path_factory.mktemp("h94"), tiny_bundle.unet)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory: pytest.TempPathFactory, tiny_sdxl_bundle: ModelBundle) -> Path:
    return write_h94_folder(tmp_path_factory.mktemp("h94xl"), tiny_sdxl_bundle.unet, sdxl=True)


def _png(seed: int, size: tuple[int, int] = (40, 56)) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 256, (*size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _pipeline(bundle: ModelBundle, folder: Path, variant: str) -> Any:
    """A diffusers pipeline around a copy of the bundle's UNet, with the adapter loaded by diffusers."""
    parts: dict[str, Any] = {
        "vae": bundle.vae,
        "unet": copy.deepcopy(bundle.unet),
        "scheduler": LCMScheduler.from_config(bundle.scheduler_config),
        "text_encoder": bundle.text_encoders[0],
        "tokenizer": bundle.tokenizers[0],
        "image_encoder": None,
        "feature_extractor": None,
    }
    if bundle.preset.is_sdxl:
        parts.update(text_encoder_2=bundle.text_encoders[1], tokenizer_2=bundle.tokenizers[1])
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, requires_safety_checker=False)
    subfolder, weight_name = WEIGHT_NAMES[(bundle.preset.is_sdxl, variant)]
    # SDXL's vit-h adapters use SD 1.5's encoder: diffusers' docs pass its folder explicitly
    encoder = "models/image_encoder" if "vit-h" in weight_name else "image_encoder"
    pipe.load_ip_adapter(
        str(folder), subfolder=subfolder, weight_name=weight_name, image_encoder_folder=encoder
    )
    return pipe


def _inputs(bundle: ModelBundle, rows: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    seq, dim = bundle.embed_shape
    inputs = {
        "latents": torch.randn(rows, 4, 16, 16, generator=gen),
        "timesteps": torch.tensor([999, 499, 259, 99][:rows]),
        "embeds": torch.randn(rows, seq, dim, generator=gen),
    }
    if bundle.preset.is_sdxl:
        assert bundle.pooled_dim is not None
        inputs["text_embeds"] = torch.randn(rows, bundle.pooled_dim, generator=gen)
        inputs["time_ids"] = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]]).repeat(rows, 1)
    return inputs


def _diffusers_row(
    pipe: Any,
    inputs: dict[str, torch.Tensor],
    row: int,
    image: bytes,
    scale: float,
    *,
    negative: bool = False,
) -> torch.Tensor:
    """diffusers' noise for one row: its encoder, its projection, its IP-Adapter processors."""
    pil = Image.open(io.BytesIO(image)).convert("RGB")
    embeds = pipe.prepare_ip_adapter_image_embeds(pil, None, torch.device("cpu"), 1, True)
    half = embeds[0].chunk(2)[0 if negative else 1]  # diffusers: [negative, positive]
    pipe.set_ip_adapter_scale(scale)
    added: dict[str, Any] = {"image_embeds": [half]}
    if "text_embeds" in inputs:
        added.update(
            text_embeds=inputs["text_embeds"][row : row + 1],
            time_ids=inputs["time_ids"][row : row + 1],
        )
    with torch.no_grad():
        return pipe.unet(
            inputs["latents"][row : row + 1],
            inputs["timesteps"][row],
            encoder_hidden_states=inputs["embeds"][row : row + 1],
            added_cond_kwargs=added,
            return_dict=False,
        )[0][0]


def _batch(
    inputs: dict[str, torch.Tensor],
    tokens: torch.Tensor | None = None,
    scales: torch.Tensor | None = None,
) -> UNetBatch:
    return UNetBatch(**inputs, ip_tokens=tokens, ip_scales=scales)


def _loaded(bundle: ModelBundle, folder: Path, variant: str) -> tuple[ModelBundle, LoadedIPAdapter]:
    own = _copy(bundle)
    adapter = load_ip_adapter(IPAdapterSpec(source=str(folder), variant=variant), own)
    return own.with_ip_adapter(adapter), adapter


# ---------------------------------------------------------------- the oracle
@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_rows_with_their_own_images_and_scales_equal_diffusers_ip_adapter(
    request: pytest.FixtureRequest, sdxl: bool, variant: str
) -> None:
    base = request.getfixturevalue("tiny_sdxl_bundle" if sdxl else "tiny_bundle")
    folder = request.getfixturevalue("sdxl_folder" if sdxl else "sd_folder")
    bundle, adapter = _loaded(base, folder, variant)
    encoder = ImagePromptEncoder(adapter)
    image_x, image_y = _png(1), _png(2, (64, 40))
    x, y = encoder.encode_bytes(image_x), encoder.encode_bytes(image_y)
    # rows: image X at 0.6, image Y at 1.0, no image, and X's unconditional tokens at 0.6
    inputs = _inputs(bundle, 4, seed=3)
    tokens, scales = row_inputs([x, y, None, x], [0.6, 1.0, 0.0, 0.6], adapter)
    tokens[3] = x.uncond_tokens
    out = bundle.predict_noise(_batch(inputs, tokens, scales))

    pipe = _pipeline(base, folder, variant)
    expected = [
        _diffusers_row(pipe, inputs, 0, image_x, 0.6),
        _diffusers_row(pipe, inputs, 1, image_y, 1.0),
        _diffusers_row(pipe, inputs, 3, image_x, 0.6, negative=True),
    ]
    for row, reference in zip((0, 1, 3), expected, strict=True):
        torch.testing.assert_close(out[row], reference, atol=ATOL, rtol=0)
    # the image changes the answer (else the comparison above proves nothing about it)
    plain = base.predict_noise(_batch(inputs))
    assert (out[0] - plain[0]).abs().max() > 100 * ATOL
    assert torch.equal(out[2], plain[2])  # scale 0: exactly the plain UNet


@pytest.mark.parametrize("variant", ["plain", "plus"])
def test_scale_zero_everywhere_is_exactly_the_plain_unet(
    tiny_bundle: ModelBundle, sd_folder: Path, variant: str
) -> None:
    bundle, adapter = _loaded(tiny_bundle, sd_folder, variant)
    prompt = ImagePromptEncoder(adapter).encode_bytes(_png(4))
    inputs = _inputs(bundle, 3, seed=5)
    tokens, _ = row_inputs([prompt, prompt, None], [1.0, 1.0, 1.0], adapter)
    out = bundle.predict_noise(_batch(inputs, tokens, torch.zeros(3)))
    plain = tiny_bundle.predict_noise(_batch(inputs))
    assert torch.equal(out, plain)
    # installed but not fed: the same bundle's plain calls are the plain UNet's too
    assert torch.equal(bundle.predict_noise(_batch(inputs)), plain)


def test_fused_qkv_keeps_the_adapter_and_the_plain_path_exact(
    tiny_bundle: ModelBundle, sd_folder: Path
) -> None:
    bundle, adapter = _loaded(tiny_bundle, sd_folder, "plain")
    prompt = ImagePromptEncoder(adapter).encode_bytes(_png(6))
    inputs = _inputs(bundle, 2, seed=7)
    tokens, scales = row_inputs([prompt, None], [0.8, 0.0], adapter)
    before = bundle.predict_noise(_batch(inputs, tokens, scales))
    apply_recipe(bundle, Recipe(fuse_qkv=True, channels_last=False, compile=False))
    after = bundle.predict_noise(_batch(inputs, tokens, scales))
    torch.testing.assert_close(after, before, atol=ATOL, rtol=0)
    plain = _copy(tiny_bundle)
    apply_recipe(plain, Recipe(fuse_qkv=True, channels_last=False, compile=False))
    assert torch.equal(after[1], plain.predict_noise(_batch(inputs))[1])


def test_sessions_packed_into_one_call_equal_each_alone(
    tiny_bundle: ModelBundle, sd_folder: Path
) -> None:
    """A session without an image shares the call (its fields absent: zeros, scale 0)."""
    bundle, adapter = _loaded(tiny_bundle, sd_folder, "plus")
    prompt = ImagePromptEncoder(adapter).encode_bytes(_png(8))
    one, two = _inputs(bundle, 2, seed=9), _inputs(bundle, 1, seed=10)
    tokens, scales = row_inputs([prompt, prompt], [0.5, 1.5], adapter)
    styled = _batch(one, tokens, scales)
    outputs, call = BatchPacker(bundle, (1, 2, 4)).predict([styled, _batch(two)])
    assert (call.rows, call.sessions) == (3, 2)
    torch.testing.assert_close(outputs[0], bundle.predict_noise(styled), atol=ATOL, rtol=0)
    torch.testing.assert_close(
        outputs[1], tiny_bundle.predict_noise(_batch(two)), atol=ATOL, rtol=0
    )


# ---------------------------------------------------------------- sources
def test_a_single_file_finds_its_encoder_in_h94_layout(
    tiny_bundle: ModelBundle, sd_folder: Path
) -> None:
    file = sd_folder / "models" / "ip-adapter_sd15.safetensors"
    _, from_folder = _loaded(tiny_bundle, sd_folder, "plain")
    from_file = load_ip_adapter(IPAdapterSpec(source=str(file)), _copy(tiny_bundle))
    image = _png(11)
    a = ImagePromptEncoder(from_folder).encode_bytes(image)
    b = ImagePromptEncoder(from_file).encode_bytes(image)
    assert torch.equal(a.tokens, b.tokens)
    assert from_file.source == str(file)


def test_random_weights_run_offline_and_differ_by_seed(tiny_bundle: ModelBundle) -> None:
    for variant, tokens in (("plain", 4), ("plus", 16)):
        one = load_ip_adapter(IPAdapterSpec("random", variant=variant, seed=1), tiny_bundle)
        two = load_ip_adapter(IPAdapterSpec("random", variant=variant, seed=2), tiny_bundle)
        assert one.token_shape == (tokens, 32)
        image = _png(12)
        a, b = (ImagePromptEncoder(x).encode_bytes(image) for x in (one, two))
        assert a.tokens.shape == (tokens, 32) and torch.isfinite(a.tokens).all()
        assert not torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize(
    ("preset", "variant", "encoder", "layers", "proj_key", "proj_shape"),
    [
        ("sd15-lcm", "plain", (1280, 1024), 16, "image_embeds.weight", (4 * 768, 1024)),
        ("sd15-lcm", "plus", (1280, 1024), 16, "proj_out.weight", (768, 768)),
        ("sdxl-turbo", "plain", (1664, 1280), 70, "image_embeds.weight", (4 * 2048, 1280)),
        ("sdxl-turbo", "plus", (1280, 1024), 70, "proj_out.weight", (2048, 1280)),
    ],
)
def test_random_builds_h94s_architecture(
    preset: str,
    variant: str,
    encoder: tuple[int, int],
    layers: int,
    proj_key: str,
    proj_shape: tuple[int, int],
) -> None:
    """On the meta device (shapes only): h94's encoder, projection and attention widths."""
    adapter = load_ip_adapter(
        IPAdapterSpec("random", variant=variant), get_preset(preset), device="meta"
    )
    config = adapter.image_encoder.config
    assert (config.hidden_size, config.projection_dim, config.image_size) == (*encoder, 224)
    assert len(adapter.processors) == layers
    assert tuple(adapter.projection.state_dict()[proj_key].shape) == proj_shape
    width = 768 if preset == "sd15-lcm" else 2048
    assert adapter.token_shape == (4 if variant == "plain" else 16, width)
    first = next(iter(adapter.processors.values()))
    assert first.to_k_ip[0].weight.shape == (320 if preset == "sd15-lcm" else 640, width)


# ---------------------------------------------------------------- refusals
@pytest.mark.parametrize("source", ["random", "h94/IP-Adapter"])
def test_sd21_is_refused_naming_the_family(source: str) -> None:
    with pytest.raises(
        ParameterError, match=r"sd-turbo is SD 2\.1, which has no public IP-Adapter"
    ):
        load_ip_adapter(IPAdapterSpec(source), get_preset("sd-turbo"), device="cpu")


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ParameterError, match=r"unknown IP-Adapter variant 'ultra'.*plain, plus"):
        IPAdapterSpec(variant="ultra")  # type: ignore[arg-type]


def test_a_file_of_another_variant_is_refused(tiny_bundle: ModelBundle, sd_folder: Path) -> None:
    file = sd_folder / "models" / "ip-adapter_sd15.safetensors"
    with pytest.raises(ModelLoadError, match="is a plain adapter; variant='plus' was asked"):
        load_ip_adapter(IPAdapterSpec(source=str(file), variant=IPAdapterVariant.PLUS), tiny_bundle)


def test_a_wrong_shape_names_both_shapes(
    tiny_bundle: ModelBundle, tiny_sdxl_bundle: ModelBundle, sd_folder: Path, tmp_path: Path
) -> None:
    # an SDXL-width adapter (cross-attention 64) on the SD-shaped tiny UNet (32)
    wide = plain_state_dict(tiny_sdxl_bundle.unet, TINY_ENCODER["projection_dim"], seed=1)
    file = save_adapter(wide, tmp_path / "models" / "wide.safetensors")
    tiny_encoder(0).save_pretrained(tmp_path / "models" / "image_encoder")
    with pytest.raises(ModelLoadError, match=r"proj\.weight is \(256, 32\), expected \(128, 32\)"):
        load_ip_adapter(IPAdapterSpec(source=str(file)), tiny_bundle)
    # one attention layer of the wrong width
    parts = plain_state_dict(tiny_bundle.unet, TINY_ENCODER["projection_dim"], seed=2)
    parts["ip_adapter"]["1.to_v_ip.weight"] = torch.zeros(32, 16)
    file = save_adapter(parts, tmp_path / "models" / "narrow.bin")
    with pytest.raises(
        ModelLoadError,
        match=r"ip_adapter\.1\.to_v_ip\.weight .* is \(32, 16\), expected \(32, 32\)",
    ):
        load_ip_adapter(IPAdapterSpec(source=str(file)), tiny_bundle)


def test_missing_and_broken_sources_are_clear(
    tiny_bundle: ModelBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ModelLoadError, match=r"has no models/ip-adapter_sd15\.safetensors"):
        load_ip_adapter(IPAdapterSpec(source=str(tmp_path)), tiny_bundle)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot be read"):
        load_ip_adapter(IPAdapterSpec(source=str(broken)), tiny_bundle)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotAvailableError, match=r"nobody/no-such-adapter.*random"):
        load_ip_adapter(IPAdapterSpec("nobody/no-such-adapter", local_files_only=True), tiny_bundle)


def test_batch_inputs_are_checked(tiny_bundle: ModelBundle, sd_folder: Path) -> None:
    bundle, _ = _loaded(tiny_bundle, sd_folder, "plain")
    inputs = _inputs(bundle, 2, seed=13)
    with pytest.raises(
        BatchCompositionError, match=r"ip_tokens is \(2, 16, 32\); expected \(2, 4, 32\)"
    ):
        bundle.predict_noise(_batch(inputs, torch.zeros(2, 16, 32), torch.zeros(2)))
    with pytest.raises(BatchCompositionError, match="needs both"):
        bundle.predict_noise(_batch(inputs, torch.zeros(2, 4, 32)))
    with pytest.raises(BatchCompositionError, match="no IP-Adapter loaded"):
        tiny_bundle.predict_noise(_batch(inputs, torch.zeros(2, 4, 32), torch.zeros(2)))


def test_tensorrt_refuses_an_ip_adapter(tiny_bundle: ModelBundle, sd_folder: Path) -> None:
    bundle, _ = _loaded(tiny_bundle, sd_folder, "plain")
    with pytest.raises(BackendError, match="does not export IP-Adapters"):
        load_tensorrt_bundle(bundle)


# ---------------------------------------------------------------- the encoder and its cache
@pytest.fixture(scope="module")
def plain_adapter(tiny_bundle: ModelBundle) -> LoadedIPAdapter:
    return load_ip_adapter(IPAdapterSpec("random", name="style"), tiny_bundle)


def test_cache_by_content_is_bounded(plain_adapter: LoadedIPAdapter) -> None:
    encoder = ImagePromptEncoder(plain_adapter, cache_entries=2)
    first = encoder.encode_bytes(_png(20))
    assert encoder.encode_bytes(_png(20)) is first  # same bytes: from the cache
    assert (encoder.hits, encoder.misses) == (1, 1)
    encoder.encode_bytes(_png(21))
    encoder.encode_bytes(_png(22))  # evicts the least recently used (image 20)
    assert len(encoder) == 2
    again = encoder.encode_bytes(_png(20))
    assert again is not first and torch.equal(again.tokens, first.tokens)
    assert encoder.misses == 4
    other = load_ip_adapter(IPAdapterSpec("random", name="other"), get_preset("tiny"), device="cpu")
    assert ImagePromptEncoder(other).cache_key(_png(20)) != encoder.cache_key(_png(20))


def test_a_pinned_image_outlives_any_number_of_uploads(plain_adapter: LoadedIPAdapter) -> None:
    encoder = ImagePromptEncoder(plain_adapter, cache_entries=2)
    pinned = encoder.encode_bytes(_png(30), pin=True)
    for seed in range(31, 36):  # five more images through a cache of two
        encoder.encode_bytes(_png(seed))
    assert encoder.lookup(pinned.key) is pinned
    assert encoder.lookup(encoder.cache_key(_png(33))) is None  # the others still cycle
    assert len(encoder) == 2


def test_arrays_and_files_of_the_same_pixels_give_the_same_tokens(
    plain_adapter: LoadedIPAdapter,
) -> None:
    data = _png(23)
    pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    encoder = ImagePromptEncoder(plain_adapter)
    from_file: ImagePrompt = encoder.encode_bytes(data)
    from_array = encoder.encode_array(pixels)
    assert torch.equal(from_file.tokens, from_array.tokens)
    # plain: the unconditional tokens are the projection of a zero embedding, as in diffusers
    zero = plain_adapter.projection(torch.zeros(1, TINY_ENCODER["projection_dim"]))[0]
    assert torch.equal(from_file.uncond_tokens, zero)


def test_bad_images_are_refused(plain_adapter: LoadedIPAdapter) -> None:
    encoder = ImagePromptEncoder(plain_adapter, max_image_bytes=100_000, max_pixels=64 * 64)
    with pytest.raises(InvalidFrameError, match="does not decode") as decoded:
        encoder.encode_bytes(b"\x89PNG not really")
    assert decoded.value.field == "ip_image"
    with pytest.raises(FrameTooLargeError, match="at most 4096 pixels"):
        encoder.encode_bytes(_png(24, (80, 80)))
    with pytest.raises(FrameTooLargeError, match="at most 100000 bytes"):
        encoder.encode_bytes(b"\0" * 100_001)
    with pytest.raises(InvalidFrameError, match=r"uint8 \[H, W, 3\]"):
        encoder.encode_array(np.zeros((8, 8), dtype=np.uint8))
    assert len(encoder) == 0


def test_the_defaults_the_readme_names(plain_adapter: LoadedIPAdapter) -> None:
    encoder = ImagePromptEncoder(plain_adapter)
    assert (encoder.cache_entries, encoder.max_image_bytes, encoder.max_pixels) == (
        64,
        16 * 1024 * 1024,
        4096 * 4096,
    )


def test_other_files_encoders_and_unsupported_kinds(
    tiny_bundle: ModelBundle, sd_folder: Path, tmp_path: Path
) -> None:
    # weight_name picks another file of the folder
    light = sd_folder / "models" / "ip-adapter_sd15_light.safetensors"
    light.write_bytes((sd_folder / "models" / "ip-adapter_sd15.safetensors").read_bytes())
    spec = IPAdapterSpec(source=str(sd_folder), weight_name=light.name)
    assert load_ip_adapter(spec, _copy(tiny_bundle)).source == str(light)
    # a lone file needs image_encoder=
    parts = plain_state_dict(tiny_bundle.unet, TINY_ENCODER["projection_dim"], seed=3)
    lone = save_adapter(parts, tmp_path / "lone" / "style.safetensors")
    with pytest.raises(ModelLoadError, match="pass image_encoder"):
        load_ip_adapter(IPAdapterSpec(source=str(lone)), tiny_bundle)
    encoder = sd_folder / "models" / "image_encoder"
    adapter = load_ip_adapter(
        IPAdapterSpec(source=str(lone), image_encoder=str(encoder)), tiny_bundle
    )
    assert adapter.token_shape == (4, 32)
    # full-face adapters are another kind
    full = {"proj.0.weight": torch.zeros(32, 32), "proj.3.weight": torch.zeros(32, 32)}
    face = save_adapter({"image_proj": full, "ip_adapter": parts["ip_adapter"]}, tmp_path / "f.bin")
    with pytest.raises(ModelLoadError, match="full-face adapter, which livediff does not run"):
        load_ip_adapter(IPAdapterSpec(source=str(face), image_encoder=str(encoder)), tiny_bundle)


def test_an_hf_repository_is_read_from_the_cache(
    tiny_bundle: ModelBundle, sd_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """h94's repository id, offline, from an HF cache that holds it (snapshot + refs/main)."""
    import shutil

    repo = tmp_path / "hub" / "models--h94--IP-Adapter"
    shutil.copytree(sd_folder, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    adapter = load_ip_adapter(IPAdapterSpec(local_files_only=True), _copy(tiny_bundle))
    assert "0123abcd" in adapter.source
    _, local = _loaded(tiny_bundle, sd_folder, "plain")
    image = _png(30)
    got = ImagePromptEncoder(adapter).encode_bytes(image).tokens
    assert torch.equal(got, ImagePromptEncoder(local).encode_bytes(image).tokens)


@pytest.mark.slow
def test_compiles_as_one_graph_with_fused_qkv_and_no_recompile(
    tiny_bundle: ModelBundle, sd_folder: Path
) -> None:
    """What ``--backend compile`` needs: ``fullgraph=True`` tracing (here with the aot_eager
    backend, which needs no compiler), and new token and scale values reuse the graph."""
    torch._dynamo.reset()  # dynamo caches per code object: other tests compile this forward too
    bundle, adapter = _loaded(tiny_bundle, sd_folder, "plus")
    apply_recipe(bundle, Recipe(fuse_qkv=True, channels_last=False, compile=False))
    prompt = ImagePromptEncoder(adapter).encode_bytes(_png(31))
    inputs = _inputs(bundle, 2, seed=32)
    tokens, scales = row_inputs([prompt, None], [0.7, 0.0], adapter)
    eager = bundle.predict_noise(_batch(inputs, tokens, scales))
    bundle.unet.forward = torch.compile(
        bundle.unet.forward, fullgraph=True, dynamic=False, backend="aot_eager"
    )
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = bundle.predict_noise(_batch(inputs, tokens, scales))
        other = bundle.predict_noise(_batch(inputs, tokens * 2, scales + 0.1))
    torch.testing.assert_close(compiled, eager, atol=ATOL, rtol=0)
    assert (other - compiled).abs().max() > 100 * ATOL
