"""Which ControlNets and preprocessor networks a server loads, from [model] and --controlnet."""

from __future__ import annotations

import logging

import pytest

from livediff.cli import build_parser
from livediff.cli_options import model_spec_from_args, stream_settings_from_args
from livediff.engine.config import StreamConfig
from livediff.engine.stream import Stream
from livediff.exceptions import ParameterError
from livediff.models.bundle import ModelBundle
from livediff.models.control_setup import attach_controlnets, controlnet_specs
from livediff.models.control_uses import ControlNetSpec, ControlUse, Preprocessor
from livediff.models.presets import get_preset
from livediff.models.spec import ModelSpec

RANDOM = ModelSpec(preset="tiny", weights="random")
DEPTH_NET = "thibaud/controlnet-sd21-depth-diffusers"


def test_named_specs_and_the_default_uses_are_loaded_once_each() -> None:
    spec = ModelSpec(
        preset="tiny",
        controlnets=[{"source": "my/edges-net", "name": "edges"}, "my/tile-net"],
    )
    uses = (ControlUse("edges", 0.8), ControlUse("other/net"), ControlUse("my/tile-net"))
    assert [(s.source, s.label) for s in controlnet_specs(spec, uses)] == [
        ("my/edges-net", "edges"),
        ("my/tile-net", "my/tile-net"),
        ("other/net", "other/net"),
    ]


def test_random_weights_build_every_net_random_under_its_own_name() -> None:
    uses = (ControlUse(DEPTH_NET), ControlUse("xinsir/controlnet-union-sdxl-1.0"))
    built = controlnet_specs(RANDOM, uses)
    assert [(s.source, s.label, s.union) for s in built] == [
        ("random", DEPTH_NET, False),
        ("random", "xinsir/controlnet-union-sdxl-1.0", True),
    ]
    assert len({s.seed for s in built}) == 2


def test_two_nets_under_one_name_are_refused() -> None:
    with pytest.raises(ParameterError, match="two ControlNets named 'edges'") as refused:
        ModelSpec(
            controlnets=[{"source": "a/b", "name": "edges"}, {"source": "c", "name": "edges"}]
        )
    assert refused.value.field == "controlnets"
    with pytest.raises(ParameterError, match="unknown: scale"):
        ModelSpec(controlnets=[{"source": "a/b", "scale": 1}])


def test_a_depth_net_brings_the_depth_network_and_is_fed_depth(
    tiny_bundle: ModelBundle,
) -> None:
    bundle = attach_controlnets(tiny_bundle, RANDOM, (ControlUse(DEPTH_NET, 0.5),))
    assert bundle.controlnet_names() == (DEPTH_NET,)
    assert bundle.control_networks is not None and bundle.control_networks.depth is not None
    assert bundle.control_networks.soft_edge is None
    stream = Stream(bundle, StreamConfig(width=128, height=128), controlnets=(DEPTH_NET,))
    (use,) = stream._control.uses if stream._control else ()
    assert use.preprocessor is Preprocessor.DEPTH  # the catalog's, for a net under its HF id
    with pytest.raises(ParameterError, match="cannot use the canny preprocessor"):
        stream.update(controlnets=[f"{DEPTH_NET}:1:canny"])


def test_soft_edge_without_weights_is_not_served_and_says_how(
    tiny_bundle: ModelBundle, caplog: pytest.LogCaptureFixture
) -> None:
    spec = ModelSpec(
        preset="tiny",
        controlnets=[ControlNetSpec("random", name="hed")],
    )
    uses = (ControlUse("hed", 1.0, "soft_edge"),)
    with caplog.at_level(logging.WARNING):
        bundle = attach_controlnets(tiny_bundle, spec, uses)
    assert "set [model] soft_edge_source" in caplog.text
    with pytest.raises(ParameterError, match="soft_edge preprocessor's network is not loaded"):
        Stream(bundle, StreamConfig(width=128, height=128), controlnets=uses)


def test_the_config_file_and_the_flag_reach_the_loader() -> None:
    args = build_parser().parse_args(
        ["serve", "--model", "tiny", "--controlnet", "edges:0.7:canny", "--controlnet", "tile"]
    )
    config = {
        "model": {"controlnets": [{"source": "random", "name": "edges", "seed": 4}]},
        "params": {},
    }
    spec = model_spec_from_args(args, config)
    _, params = stream_settings_from_args(args, config, get_preset(spec.preset))
    assert params.controlnets == (ControlUse("edges", 0.7, "canny"), ControlUse("tile"))
    assert [(s.source, s.label, s.seed) for s in controlnet_specs(spec, params.controlnets)] == [
        ("random", "edges", 4),
        ("tile", "tile", 0),
    ]
