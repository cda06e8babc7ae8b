"""The TensorRT backend on CUDA: engines for the tiny model match eager, and the cache is hit.

Needs TensorRT (``pip install 'livediff[tensorrt]'``) and a CUDA device; the module is skipped
cleanly without either. The profile is narrower than the default: the tiny UNet's attention
heads are 4 wide, too narrow for TensorRT's fused attention, so at the default 1024 px × 16
rows its unfused attention scores alone would need tens of GB of scratch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from livediff.engine.backend_fit import make_stream
from livediff.engine.config import StreamConfig
from livediff.engine.stream import Stream
from livediff.exceptions import BackendError
from livediff.models.backends import Backend, runtime_bundle
from livediff.models.bundle import ModelBundle
from livediff.models.onnx_export import GraphName
from livediff.models.tensorrt_engine import TensorRTBundle, load_tensorrt_bundle
from livediff.models.trt_cache_key import EngineProfile, engine_key
from livediff.models.unet_batch import UNetBatch

pytestmark = pytest.mark.gpu
tensorrt = pytest.importorskip("tensorrt", reason="TensorRT is an optional extra")

PROFILE = EngineProfile(batch=(1, 4, 8), side=(256, 384, 512))
BUCKETS = (1, 2, 4, 8)
# fp16 on both sides with different kernels (TensorRT's fused convolutions and its own
# accumulation order): rounding errors of a few 1e-3 on outputs of magnitude ~1. A wrong
# input binding, stale padding row or misplaced scaling is an O(1) error.
TOLERANCE = {"rtol": 2e-2, "atol": 2e-2}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tensorrt")


@pytest.fixture(scope="module")
def trt_bundle(cuda_tiny_bundle: ModelBundle, cache_dir: Path) -> TensorRTBundle:
    return load_tensorrt_bundle(
        cuda_tiny_bundle, profile=PROFILE, buckets=BUCKETS, cache_dir=cache_dir
    )


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to("cuda", torch.float16)


def _unet_batch(bundle: ModelBundle, rows: int, h: int, w: int) -> UNetBatch:
    seq, dim = bundle.embed_shape
    timesteps = torch.linspace(999, 1, rows).long().cuda()
    return UNetBatch(_randn(rows, 4, h, w), timesteps, _randn(rows, seq, dim, seed=1))


def test_first_load_builds_every_engine(trt_bundle: TensorRTBundle, cache_dir: Path) -> None:
    assert set(trt_bundle.engines) == set(GraphName)
    for cached in trt_bundle.engines.values():
        assert cached.built
        assert cached.path.parent == cache_dir and cached.path.stat().st_size > 0
        assert cached.path.with_suffix(".json").is_file()
        assert cached.key.tensorrt_version == tensorrt.__version__


def test_second_load_hits_the_cache(
    trt_bundle: TensorRTBundle, cuda_tiny_bundle: ModelBundle, cache_dir: Path
) -> None:
    stamps = {g: c.path.stat().st_mtime_ns for g, c in trt_bundle.engines.items()}
    again = load_tensorrt_bundle(
        cuda_tiny_bundle, profile=PROFILE, buckets=BUCKETS, cache_dir=cache_dir
    )
    assert not any(c.built for c in again.engines.values())
    assert {g: c.path for g, c in again.engines.items()} == {
        g: c.path for g, c in trt_bundle.engines.items()
    }
    assert {g: c.path.stat().st_mtime_ns for g, c in again.engines.items()} == stamps
    # A different resolution range names another file: never the cached engine (#152).
    wider = EngineProfile(batch=PROFILE.batch, side=(256, 384, 640))
    key = engine_key(
        cuda_tiny_bundle,
        GraphName.UNET,
        wider,
        tensorrt_version=tensorrt.__version__,
        compute_capability=torch.cuda.get_device_capability(),
    )
    assert key.weights == trt_bundle.engines[GraphName.UNET].key.weights
    assert not (cache_dir / key.filename).exists()


@pytest.mark.parametrize(("rows", "h", "w"), [(1, 32, 32), (3, 48, 32), (8, 64, 64)])
def test_unet_matches_eager(
    trt_bundle: TensorRTBundle, cuda_tiny_bundle: ModelBundle, rows: int, h: int, w: int
) -> None:
    batch = _unet_batch(cuda_tiny_bundle, rows, h, w)
    expected = ModelBundle.predict_noise(cuda_tiny_bundle, batch)
    actual = trt_bundle.predict_noise(batch)
    assert actual.shape == expected.shape and actual.dtype == torch.float16
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCE)


@pytest.mark.parametrize(("rows", "h", "w"), [(1, 32, 32), (3, 48, 64)])
def test_vae_halves_match_eager(
    trt_bundle: TensorRTBundle, cuda_tiny_bundle: ModelBundle, rows: int, h: int, w: int
) -> None:
    images = _randn(rows, 3, 8 * h, 8 * w).clamp(-1, 1)
    latents = trt_bundle.encode(images)
    torch.testing.assert_close(
        latents.float(), cuda_tiny_bundle.encode(images).float(), **TOLERANCE
    )
    decoded = trt_bundle.decode(latents.clone())
    expected = ModelBundle.decode(cuda_tiny_bundle, latents.clone())
    torch.testing.assert_close(decoded.float(), expected.float(), **TOLERANCE)


def test_rows_beyond_the_largest_bucket_run_in_chunks(
    trt_bundle: TensorRTBundle, cuda_tiny_bundle: ModelBundle
) -> None:
    batch = _unet_batch(cuda_tiny_bundle, 11, 32, 32)
    expected = ModelBundle.predict_noise(cuda_tiny_bundle, batch)
    actual = trt_bundle.predict_noise(batch)
    assert actual.shape[0] == 11
    torch.testing.assert_close(actual.float(), expected.float(), **TOLERANCE)


def test_shapes_outside_the_profile_fail_loudly(
    trt_bundle: TensorRTBundle, cuda_tiny_bundle: ModelBundle
) -> None:
    with pytest.raises(BackendError, match="outside the engine's profile"):
        trt_bundle.predict_noise(_unet_batch(cuda_tiny_bundle, 1, 16, 16))  # 128 px


def test_no_capture_after_warm_up(
    trt_bundle: TensorRTBundle, cuda_tiny_bundle: ModelBundle
) -> None:
    trt_bundle.warm_up((48, 48))
    captured = trt_bundle.captured()
    assert captured >= 3 * len(BUCKETS)
    for rows in (1, 2, 3, 5, 8):
        trt_bundle.predict_noise(_unet_batch(cuda_tiny_bundle, rows, 48, 48))
        trt_bundle.decode(_randn(rows, 4, 48, 48))
        trt_bundle.encode(_randn(rows, 3, 384, 384))
    assert trt_bundle.captured() == captured


def test_runtime_and_stream_do_not_wrap_it_again(trt_bundle: TensorRTBundle) -> None:
    same = runtime_bundle(
        trt_bundle, Backend.TENSORRT, latent_size=(48, 48), buckets=(1, 2, 4, 8, 16, 32)
    )
    assert same is trt_bundle
    assert trt_bundle.buckets == BUCKETS  # 16 and 32 are beyond the profile's 8 rows
    stream = make_stream(trt_bundle, Backend.TENSORRT, StreamConfig(width=384, height=384))
    assert type(stream) is Stream and stream.bundle is trt_bundle


def test_stream_output_matches_eager(
    trt_bundle: TensorRTBundle, cuda_tiny_bundle: ModelBundle
) -> None:
    rng = np.random.default_rng(0)
    frame = torch.from_numpy(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)).cuda()
    config = StreamConfig(width=384, height=384)
    outputs = [
        Stream(bundle, config, prompt="a boat", seed=3).process(frame)[0].image
        for bundle in (cuda_tiny_bundle, trt_bundle)
    ]
    difference = (outputs[0].int() - outputs[1].int()).abs()
    # uint8 after encode → UNet → decode in fp16: the tolerance above, in 0–255 steps
    assert difference.float().mean() < 1.0 and int(difference.max()) <= 8
