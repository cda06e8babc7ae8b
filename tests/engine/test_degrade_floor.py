"""A backend with a smallest side (TensorRT's profile) raises the degraded resolution to it."""

from __future__ import annotations

import torch

from livediff.engine.backend_fit import fit_degrade_to_bundle
from livediff.engine.degrade import DegradeLevel, DegradePolicy, degraded_size
from livediff.models.bundle import ModelBundle
from livediff.models.onnx_export import GraphName
from livediff.models.tensorrt_engine import EngineRunner, TensorRTBundle
from livediff.models.trt_cache_key import EngineProfile


def tensorrt_view(bundle: ModelBundle, profile: EngineProfile) -> TensorRTBundle:
    """``bundle`` seen as a TensorRT bundle whose runners hold ``profile``.

    A stand-in, because TensorRT cannot be installed on these machines: the runners carry no
    engine, and nothing here runs one; only the profile they were built for is read.
    """
    view = TensorRTBundle.wrap(bundle)
    runners = {
        name: EngineRunner(
            name=name.value,
            engine=None,
            trt=None,
            inputs=(),
            output="",
            buckets=(1,),
            profile=profile,
            scratch=torch.empty(0),
            pixels_per_cell=8,
        )
        for name in GraphName
    }
    view.setup_engines(runners, {}, ())
    return view


def test_tensorrt_raises_the_lowest_resolution_to_its_profile(tiny_bundle: ModelBundle) -> None:
    policy = DegradePolicy()  # half the size, at least 64 px
    assert degraded_size(512, 512, DegradeLevel.LOWER_RESOLUTION, policy) == (256, 256)
    fitted = fit_degrade_to_bundle(policy, tensorrt_view(tiny_bundle, EngineProfile()))
    assert fitted.min_side == 384
    assert degraded_size(512, 512, DegradeLevel.LOWER_RESOLUTION, fitted) == (384, 384)
    assert degraded_size(1024, 768, DegradeLevel.LOWER_RESOLUTION, fitted) == (512, 384)
    assert (fitted.enabled, fitted.resolution_scale) == (policy.enabled, policy.resolution_scale)


def test_a_higher_floor_and_other_backends_are_left_alone(tiny_bundle: ModelBundle) -> None:
    high = DegradePolicy(min_side=448)
    assert fit_degrade_to_bundle(high, tensorrt_view(tiny_bundle, EngineProfile())) is high
    policy = DegradePolicy()
    assert fit_degrade_to_bundle(policy, tiny_bundle) is policy
