"""A model's ControlNets and preprocessor networks, loaded and attached before the backend runs.

The nets to load are ``[model] controlnets`` (specs with their own names) plus, for every use
the default parameters name (``--controlnet SOURCE[:SCALE[:PREPROCESSOR]]``) that no spec
names, a net loaded from that source under that name. With ``weights = "random"`` every net is
built with the family's ControlNet architecture and random weights, under the same name (speed
runs of the real shapes, offline).

The depth and soft edge preprocessors' networks load when a loaded net can use them (the
catalog says so, or the net is not in the catalog and a default use asks for it):
``[model] depth_source`` (default Depth Anything V2 Small) and ``soft_edge_source``
(ControlNet's HED weights; no default file: soft edge is then not served, and a session asking
for it is told so).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from livediff.models.bundle import ModelBundle
from livediff.models.control_images import PreprocessorNetworks
from livediff.models.control_uses import ControlNetSpec, ControlUse, Preprocessor
from livediff.models.controlnet_catalog import accepted_preprocessors, known_controlnet
from livediff.models.controlnet_loading import load_controlnet
from livediff.models.depth import DEPTH_ANYTHING_V2_SMALL, load_depth_estimator
from livediff.models.soft_edge import load_soft_edge_detector
from livediff.models.spec import ModelSpec, WeightsMode

log = logging.getLogger(__name__)


def requested_controlnets(
    spec: ModelSpec, uses: Sequence[ControlUse]
) -> tuple[ControlNetSpec, ...]:
    """The nets ``spec`` and the default ``uses`` ask for (see the module docstring)."""
    specs = list(spec.controlnets)
    named = {s.label for s in specs}
    specs += [ControlNetSpec(use.controlnet) for use in uses if use.controlnet not in named]
    return tuple(specs)


def controlnet_specs(spec: ModelSpec, uses: Sequence[ControlUse]) -> tuple[ControlNetSpec, ...]:
    """What to build: the requested nets, each random under its own name with random weights."""
    requested = requested_controlnets(spec, uses)
    if spec.weights is not WeightsMode.RANDOM:
        return requested
    return tuple(_random(s, seed=spec.seed + k) for k, s in enumerate(requested))


def _random(spec: ControlNetSpec, *, seed: int) -> ControlNetSpec:
    if spec.is_random:
        return spec
    known = known_controlnet(spec.source)
    union = spec.union if spec.union is not None else bool(known and known.union)
    return dataclasses.replace(spec, source="random", name=spec.label, union=union, seed=seed)


def needed_networks(
    specs: Sequence[ControlNetSpec], uses: Sequence[ControlUse]
) -> frozenset[Preprocessor]:
    """The preprocessors with networks that these nets (as requested) and default uses may run."""
    needed = {use.preprocessor for use in uses if use.preprocessor is not None}
    for spec in specs:
        needed.update(accepted_preprocessors(spec.source) or ())
    return frozenset(needed) & {Preprocessor.DEPTH, Preprocessor.SOFT_EDGE}


def attach_controlnets(
    bundle: ModelBundle, spec: ModelSpec, uses: Sequence[ControlUse] = ()
) -> ModelBundle:
    """``bundle`` with the ControlNets and preprocessor networks ``spec`` and ``uses`` need."""
    requested = requested_controlnets(spec, uses)
    if not requested:
        return bundle
    nets = [load_controlnet(s, bundle) for s in controlnet_specs(spec, uses)]
    for slot, net in enumerate(nets):
        log.info("control slot %d: %s", slot, net.describe())
    networks = _load_networks(needed_networks(requested, uses), spec, bundle)
    return bundle.with_controlnets(nets, networks)


def _load_networks(
    needed: frozenset[Preprocessor], spec: ModelSpec, bundle: ModelBundle
) -> PreprocessorNetworks:
    random = spec.weights is WeightsMode.RANDOM
    networks = PreprocessorNetworks()
    device, dtype = bundle.device, bundle.dtype
    if Preprocessor.DEPTH in needed:
        depth = spec.depth_source or ("random" if random else DEPTH_ANYTHING_V2_SMALL)
        networks.depth = load_depth_estimator(
            depth, device=device, dtype=dtype, offline=spec.local_files_only
        )
    if Preprocessor.SOFT_EDGE in needed:
        source = spec.soft_edge_source or ("random" if random else None)
        if source is None:
            log.warning(
                "the soft_edge preprocessor is not served: set [model] soft_edge_source to "
                "ControlNet's HED weights (ControlNetHED.pth of lllyasviel/Annotators)"
            )
        else:
            networks.soft_edge = load_soft_edge_detector(source, device=device, dtype=dtype)
    return networks
