"""What IP-Adapter to load (:class:`IPAdapterSpec`), its variants, and h94's published files.

Light on purpose (no torch): settings may declare a model's IP-Adapter with these types, and
``livediff --help`` must not load torch. Loading is :mod:`livediff.models.ip_adapter_loading`;
the per-row UNet call is :mod:`livediff.models.ip_adapter`.

``h94/IP-Adapter`` keeps every adapter in one repository (the layout a local folder follows too)::

    models/ip-adapter_sd15.safetensors            plain, SD 1.5, image encoder models/image_encoder
    models/ip-adapter-plus_sd15.safetensors       plus,  SD 1.5, models/image_encoder
    sdxl_models/ip-adapter_sdxl.safetensors       plain, SDXL,   sdxl_models/image_encoder
    sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors  plus, SDXL, models/image_encoder

(each also as ``.bin``; ``weight_name`` picks any other file of the same layouts, such as
``ip-adapter_sd15_light.bin``, ``ip-adapter-plus-face_sd15.bin`` or
``ip-adapter_sdxl_vit-h.safetensors``; ``image_encoder`` then names its encoder when it is not
the default one). SD 2.1 (``sd-turbo``) has no public IP-Adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import PurePosixPath

from livediff.exceptions import ParameterError
from livediff.models.presets import Family

H94 = "h94/IP-Adapter"
RANDOM = "random"
MAX_IP_SCALE = 2.0


class IPAdapterVariant(str, Enum):
    """How the image becomes prompt tokens."""

    PLAIN = "plain"  # CLIP's pooled image embedding → 4 tokens (a linear projection)
    PLUS = "plus"  # CLIP's penultimate patch features → 16 tokens (a perceiver resampler)

    @property
    def uses_patch_features(self) -> bool:
        return self is IPAdapterVariant.PLUS


def parse_variant(value: IPAdapterVariant | str) -> IPAdapterVariant:
    try:
        return IPAdapterVariant(value)
    except ValueError:
        names = ", ".join(v.value for v in IPAdapterVariant)
        raise ParameterError(
            f"unknown IP-Adapter variant {value!r}; choose one of: {names}", field="variant"
        ) from None


@dataclass(frozen=True)
class PublishedAdapter:
    """One of h94's adapters: its file and the encoder folder it was trained with."""

    weight_path: str  # inside the repository
    encoder_path: str  # inside the repository

    @property
    def subfolder(self) -> str:
        return str(PurePosixPath(self.weight_path).parent)

    @property
    def weight_name(self) -> str:
        return PurePosixPath(self.weight_path).name


PUBLISHED: dict[tuple[Family, IPAdapterVariant], PublishedAdapter] = {
    (Family.SD15, IPAdapterVariant.PLAIN): PublishedAdapter(
        "models/ip-adapter_sd15.safetensors", "models/image_encoder"
    ),
    (Family.SD15, IPAdapterVariant.PLUS): PublishedAdapter(
        "models/ip-adapter-plus_sd15.safetensors", "models/image_encoder"
    ),
    (Family.SDXL, IPAdapterVariant.PLAIN): PublishedAdapter(
        "sdxl_models/ip-adapter_sdxl.safetensors", "sdxl_models/image_encoder"
    ),
    (Family.SDXL, IPAdapterVariant.PLUS): PublishedAdapter(
        "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", "models/image_encoder"
    ),
}
# Files h94 publishes besides the defaults, and the encoder each needs (by file stem).
OTHER_ENCODERS = {
    "ip-adapter_sdxl_vit-h": "models/image_encoder",
    "ip-adapter-plus-face_sdxl_vit-h": "models/image_encoder",
}


def published_adapter(
    family: Family, variant: IPAdapterVariant, model_name: str
) -> PublishedAdapter:
    """h94's adapter for ``family`` and ``variant``; refuses families that have none."""
    adapter = PUBLISHED.get((family, variant))
    if adapter is None:
        families = sorted({f.label for f, _ in PUBLISHED})
        raise ParameterError(
            f"the model {model_name} is {family.label}, which has no public IP-Adapter "
            f"(h94/IP-Adapter covers {' and '.join(families)}); use sd15-lcm or sdxl-turbo "
            "for image prompts",
            field="ip_adapter",
        )
    return adapter


@dataclass(frozen=True)
class IPAdapterSpec:
    """What IP-Adapter to load for a model.

    ``source`` is a Hugging Face repository in h94's layout (default ``h94/IP-Adapter``, read
    from the HF cache; downloaded unless offline), a local folder in that layout, a single
    ``.safetensors`` / ``.bin`` file, or ``"random"``: the family's exact architecture
    (encoder, projection, attention weights) with seeded random weights.

    ``weight_name`` is the file inside the repository or folder (default: h94's file for the
    family and ``variant``). ``image_encoder`` is the CLIP vision encoder: a folder inside the
    repository, a local folder or an HF id (default: the one h94 trained the adapter with; for a
    single file, that folder beside it in h94's layout, else an ``image_encoder/`` folder beside
    the file).
    """

    source: str = H94
    variant: IPAdapterVariant = IPAdapterVariant.PLAIN
    weight_name: str | None = None
    image_encoder: str | None = None
    name: str | None = None
    seed: int = 0
    local_files_only: bool | None = None

    def __post_init__(self) -> None:
        if not self.source:
            raise ParameterError(
                "an IP-Adapter needs a source: an HF id, a folder, a file or 'random'",
                field="source",
            )
        object.__setattr__(self, "variant", parse_variant(self.variant))
        if self.name is not None and not self.name.strip():
            raise ParameterError("an IP-Adapter's name must not be empty", field="name")

    @property
    def is_random(self) -> bool:
        return self.source == RANDOM

    @property
    def label(self) -> str:
        """The name the adapter goes by: ``name``, else the source and file."""
        if self.name:
            return self.name
        return f"{self.source}:{self.weight_name}" if self.weight_name else self.source
