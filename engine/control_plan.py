"""A session's ControlNet uses resolved against the loaded nets, and its control images per frame.

``GenerationParams.controlnets`` names nets by the names the server loaded them under
(:class:`~livediff.models.control_uses.ControlUse`); :func:`resolve_control` checks each use
(the net is loaded, its preprocessor is one it was trained on, what the preprocessor needs is
there) and maps it to its slot, ``ModelBundle.controlnets[k]``. A :class:`ControlPlan` then
makes one frame group's control images ``[F, K, 3, H, W]``: each distinct preprocessor (with
its parameters) runs once over the group, whatever number of nets use its result; a slot the
session does not use stays zero with scale 0 (the net still runs for its rows: every session of
a model with ControlNets shares one UNet call shape).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from livediff.engine.control_batch import ControlRequest, SlotUse, control_images
from livediff.exceptions import ParameterError
from livediff.models.control_uses import (
    UNION_CONTROL_TYPES,
    ControlUse,
    Preprocessor,
)
from livediff.models.controlnet_catalog import (
    accepted_preprocessors,
    check_preprocessor,
    known_controlnet,
)

if TYPE_CHECKING:
    from livediff.models.bundle import ModelBundle
    from livediff.models.controlnet import LoadedControlNet

# Preprocessors that read the session's input frame (txt2img has none).
FRAME_PREPROCESSORS = frozenset(
    (Preprocessor.CANNY, Preprocessor.DEPTH, Preprocessor.SOFT_EDGE, Preprocessor.PASSTHROUGH)
)
NETWORKS = {Preprocessor.DEPTH: "depth", Preprocessor.SOFT_EDGE: "soft_edge"}


@dataclass(frozen=True)
class ControlPlan:
    """How a session feeds the model's ControlNets (see the module docstring)."""

    slots: int
    uses: tuple[SlotUse, ...] = ()

    def scales(self, client: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """``[K]``: each slot's scale (0 for nets this session does not use, and for a
        ``client`` use whose slot has no image in ``client`` yet)."""
        values = torch.zeros(self.slots, dtype=torch.float32)
        for use in self.uses:
            waiting = use.preprocessor is Preprocessor.CLIENT and use.slot not in (client or {})
            values[use.slot] = 0.0 if waiting else use.scale
        return values

    def request(
        self,
        size: tuple[int, int],
        pixels: torch.Tensor | None,
        previous: torch.Tensor | None,
        *,
        rows: int,
        like: torch.Tensor,
        client: Mapping[int, torch.Tensor] | None = None,
    ) -> ControlRequest:
        """What one frame group's control images need (:class:`ControlRequest` says what each
        argument is), for :func:`~livediff.engine.control_batch.control_images`, which
        answers a batch's sessions together."""
        return ControlRequest(
            self.slots,
            self.uses,
            size,
            pixels,
            previous,
            rows,
            like.dtype,
            like.device,
            dict(client or {}),
        )

    def images(
        self,
        size: tuple[int, int],
        pixels: torch.Tensor | None,
        previous: torch.Tensor | None,
        *,
        rows: int,
        like: torch.Tensor,
        networks: object = None,
        client: Mapping[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The control images ``[rows, K, 3, *size]`` of one frame group, as ``like``'s
        dtype/device (this session alone; see :meth:`request`)."""
        request = self.request(size, pixels, previous, rows=rows, like=like, client=client)
        return control_images([request], networks)[0]


def default_preprocessor(controlnet: LoadedControlNet, bundle: ModelBundle) -> Preprocessor:
    """The first preprocessor the net was trained on (the catalog's order) that this server
    runs; canny for a net the catalog does not know."""
    accepted = accepted_preprocessors(catalog_id(controlnet), _union_mode(controlnet))
    for preprocessor in accepted or (Preprocessor.CANNY,):
        network = NETWORKS.get(preprocessor)
        if preprocessor is Preprocessor.CLIENT:
            continue
        if network is None or getattr(bundle.control_networks, network, None) is not None:
            return preprocessor
    return (accepted or (Preprocessor.CANNY,))[0]


def resolve_control(
    uses: Sequence[ControlUse], bundle: ModelBundle, *, has_input_frames: bool
) -> ControlPlan | None:
    """``uses`` checked against ``bundle``'s ControlNets (``None``: the model has none)."""
    loaded = {net.name: k for k, net in enumerate(bundle.controlnets)}
    if not bundle.controlnets:
        if uses:
            raise ParameterError(
                f"controlnet {uses[0].controlnet!r} is not loaded: this server has no "
                "ControlNet (start it with --controlnet SOURCE or [[model.controlnets]])",
                field="controlnets",
            )
        return None
    resolved = []
    for use in uses:
        if use.controlnet not in loaded:
            raise ParameterError(
                f"controlnet {use.controlnet!r} is not loaded on this server; loaded: "
                f"{', '.join(sorted(loaded))}",
                field="controlnets",
            )
        slot = loaded[use.controlnet]
        net = bundle.controlnets[slot]
        preprocessor = use.preprocessor or default_preprocessor(net, bundle)
        try:
            check_preprocessor(net.name, catalog_id(net), preprocessor, _union_mode(net))
            _check_available(preprocessor, bundle, has_input_frames)
        except ParameterError as exc:  # the client sent "controlnets": blame that key
            raise ParameterError(str(exc), field="controlnets") from None
        resolved.append(SlotUse(slot, preprocessor, use.params, use.scale))
    return ControlPlan(len(bundle.controlnets), tuple(resolved))


def control_options(bundle: ModelBundle) -> list[dict[str, object]]:
    """Each loaded net: its name, the preprocessors it can be fed on this server, its default."""
    options: list[dict[str, object]] = []
    for net in bundle.controlnets:
        accepted = accepted_preprocessors(catalog_id(net), _union_mode(net)) or tuple(Preprocessor)
        served = [p.value for p in accepted if _served(p, bundle)]
        default = default_preprocessor(net, bundle).value
        options.append({"name": net.name, "preprocessors": served, "default": default})
    return options


def _served(preprocessor: Preprocessor, bundle: ModelBundle) -> bool:
    network = NETWORKS.get(preprocessor)
    return network is None or getattr(bundle.control_networks, network, None) is not None


def _check_available(
    preprocessor: Preprocessor, bundle: ModelBundle, has_input_frames: bool
) -> None:
    if preprocessor in FRAME_PREPROCESSORS and not has_input_frames:
        raise ParameterError(
            f"the {preprocessor.value} preprocessor reads the input frame, and a txt2img "
            "session has none: use previous_output",
            field="preprocessor",
        )
    network = NETWORKS.get(preprocessor)
    if network is not None and getattr(bundle.control_networks, network, None) is None:
        raise ParameterError(
            f"the {preprocessor.value} preprocessor's network is not loaded on this server "
            f"(it loads when a ControlNet that uses it is loaded)",
            field="preprocessor",
        )


def catalog_id(controlnet: LoadedControlNet) -> str:
    """What the catalog knows a net as: its source, or, for one built with random weights under
    a published net's name (``--weights random --controlnet ID``), that name."""
    return controlnet.source if known_controlnet(controlnet.source) else controlnet.name


def _union_mode(controlnet: LoadedControlNet) -> str | None:
    if controlnet.control_index is None:
        return None
    names = {index: name for name, index in UNION_CONTROL_TYPES.items()}
    return names.get(controlnet.control_index)
