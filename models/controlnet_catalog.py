"""The ControlNets users want for each preset, and which preprocessors each can use.

:data:`KNOWN_CONTROLNETS` is the README's table. :func:`check_preprocessor` refuses a
preprocessor that a known ControlNet was not trained on (a depth map for a canny net); a
ControlNet not in the table (a user's own) accepts every preprocessor.

Lineart and scribble nets were trained on their own annotators (thin line drawings,
thresholded HED); the soft edge and canny preprocessors are their nearest here, and the
``client`` preprocessor takes a drawing the client makes. Openpose nets need a pose skeleton
image from the client (there is no pose estimator here).
"""

from __future__ import annotations

from dataclasses import dataclass

from livediff.exceptions import ParameterError
from livediff.models.control_uses import Preprocessor
from livediff.models.presets import Family

P = Preprocessor


@dataclass(frozen=True)
class KnownControlNet:
    """A published ControlNet: its HF id, family, and the preprocessors it can use."""

    id: str
    family: Family
    preprocessors: tuple[Preprocessor, ...]
    union: bool = False


_LINES = (P.SOFT_EDGE, P.CANNY, P.CLIENT)
_POSE = (P.CLIENT,)
# A union net's preprocessors per control mode (ControlNetSpec.control_type).
UNION_PREPROCESSORS: dict[str, tuple[Preprocessor, ...]] = {
    "openpose": _POSE,
    "depth": (P.DEPTH, P.CLIENT),
    "soft_edge": (P.SOFT_EDGE, P.CLIENT),
    "canny": (P.CANNY, P.CLIENT),
    "normal": (P.CLIENT,),
    "segment": (P.CLIENT,),
    "tile": (P.PASSTHROUGH,),
    "inpaint": (P.CLIENT,),
}

KNOWN_CONTROLNETS: dict[str, tuple[KnownControlNet, ...]] = {
    "sd-turbo": tuple(
        KnownControlNet(f"thibaud/controlnet-sd21-{kind}-diffusers", Family.SD21, preprocessors)
        for kind, preprocessors in (
            ("canny", (P.CANNY,)),
            ("depth", (P.DEPTH,)),
            ("hed", (P.SOFT_EDGE,)),
            ("openpose", _POSE),
            ("lineart", _LINES),
            ("scribble", _LINES),
        )
    ),
    "sd15-lcm": (
        KnownControlNet("lllyasviel/control_v11p_sd15_canny", Family.SD15, (P.CANNY,)),
        KnownControlNet("lllyasviel/control_v11p_sd15_openpose", Family.SD15, _POSE),
        KnownControlNet("lllyasviel/control_v11p_sd15_softedge", Family.SD15, (P.SOFT_EDGE,)),
        KnownControlNet("lllyasviel/control_v11p_sd15_lineart", Family.SD15, _LINES),
        KnownControlNet("lllyasviel/control_v11p_sd15_scribble", Family.SD15, _LINES),
        KnownControlNet("lllyasviel/control_v11f1p_sd15_depth", Family.SD15, (P.DEPTH,)),
        KnownControlNet("lllyasviel/control_v11f1e_sd15_tile", Family.SD15, (P.PASSTHROUGH,)),
        KnownControlNet("CiaraRowles/TemporalNet", Family.SD15, (P.PREVIOUS_OUTPUT,)),
    ),
    "sdxl-turbo": (
        KnownControlNet("diffusers/controlnet-canny-sdxl-1.0", Family.SDXL, (P.CANNY,)),
        KnownControlNet("diffusers/controlnet-depth-sdxl-1.0", Family.SDXL, (P.DEPTH,)),
        KnownControlNet(
            "xinsir/controlnet-union-sdxl-1.0",
            Family.SDXL,
            tuple(dict.fromkeys(p for ps in UNION_PREPROCESSORS.values() for p in ps)),
            union=True,
        ),
    ),
}


def known_controlnet(source: str) -> KnownControlNet | None:
    """The table's entry for an HF id, if it has one."""
    for entries in KNOWN_CONTROLNETS.values():
        for entry in entries:
            if entry.id == source:
                return entry
    return None


def accepted_preprocessors(
    source: str, control_type: str | None = None
) -> tuple[Preprocessor, ...] | None:
    """What a ControlNet can use: ``None`` for one not in the table (anything goes)."""
    entry = known_controlnet(source)
    if entry is None:
        return None
    if entry.union and control_type is not None:
        return UNION_PREPROCESSORS.get(control_type, entry.preprocessors)
    return entry.preprocessors


def check_preprocessor(
    name: str, source: str, preprocessor: Preprocessor, control_type: str | None = None
) -> None:
    """Refuse a preprocessor the ControlNet ``source`` (loaded as ``name``) cannot use."""
    accepted = accepted_preprocessors(source, control_type)
    if accepted is not None and preprocessor not in accepted:
        mode = f" in its {control_type} mode" if control_type else ""
        raise ParameterError(
            f"controlnet {name!r} ({source}) cannot use the {preprocessor.value} "
            f"preprocessor{mode}; it takes: {', '.join(p.value for p in accepted)}",
            field="preprocessor",
        )
