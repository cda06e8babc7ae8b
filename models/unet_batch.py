"""The data contract between the engine and a model's UNet: rows in, noise predictions out.

:class:`UNetBatch` is the one per-row structure of a shared batch: every field is a tensor whose
first dimension is the row (one latent of one session), or ``None`` where a model does not use
it. Code that moves rows around — packing several sessions into one call, padding to a batch
bucket, splitting the answer, graph capture — walks the fields (:meth:`UNetBatch.row_fields`)
and never names them. A new per-row input (a ControlNet's control image and scale, an image
embedding, a LoRA index) is one new field with :func:`row_input` metadata, read by the model
that uses it; the batching code does not change.

:func:`row_input` says what a row of a session that does not send the input holds when it
shares a call with sessions that do: ``zeros`` (a scale of 0 turns it off) or nothing (every
session of a call must send it: the scheduler groups them apart).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any

import torch


class Absent(str, Enum):
    """What the rows of a session that lacks a per-row input hold in a shared call."""

    FORBID = "forbid"  # every session of a call must send it
    ZEROS = "zeros"  # its rows are zeros (the input's own scale makes that "off")


def row_input(
    *, absent: Absent = Absent.FORBID, pad_zeros: bool = False, doc: str = ""
) -> dict[str, Any]:
    """The metadata that makes a field of :class:`UNetBatch` per-row (first dimension: the row)::

    control: torch.Tensor | None = field(default=None, metadata=row_input(absent=Absent.ZEROS))

    Rows that pad a call up to its bucket copy the first row, unless ``pad_zeros``: for an
    input that makes a row *write* somewhere (a feature bank entry), where zeros write nowhere.
    """
    return {"row_input": True, "absent": absent, "pad_zeros": pad_zeros, "doc": doc}


@dataclass(frozen=True)
class Conditioning:
    """Prompt conditioning for one side (positive or negative) of guidance."""

    embeds: torch.Tensor  # [1, S, D]
    pooled: torch.Tensor | None = None  # [1, P] (SDXL)
    time_ids: torch.Tensor | None = None  # [1, 6] (SDXL)


@dataclass(frozen=True)
class UNetBatch:
    """The inputs of one UNet call, one row per latent; SDXL also sets ``text_embeds``/``time_ids``."""

    latents: torch.Tensor = field(metadata=row_input(doc="noisy latents [rows, 4, h, w]"))
    timesteps: torch.Tensor = field(metadata=row_input(doc="timestep per row [rows] (long)"))
    embeds: torch.Tensor = field(metadata=row_input(doc="prompt embeddings [rows, S, D]"))
    text_embeds: torch.Tensor | None = field(
        default=None, metadata=row_input(doc="SDXL pooled text embeddings [rows, P]")
    )
    time_ids: torch.Tensor | None = field(
        default=None, metadata=row_input(doc="SDXL size conditioning [rows, 6]")
    )
    control_images: torch.Tensor | None = field(
        default=None,
        metadata=row_input(
            absent=Absent.ZEROS,
            doc="ControlNet control images [rows, K, 3, H, W] in [0, 1] at the pixel size; "
            "slot k feeds the model's k-th ControlNet (ModelBundle.controlnets)",
        ),
    )
    control_scales: torch.Tensor | None = field(
        default=None,
        metadata=row_input(
            absent=Absent.ZEROS,
            doc="ControlNet conditioning scale [rows, K] per row and slot; 0 turns that "
            "ControlNet off for the row (the net still runs: its residuals are zeroed)",
        ),
    )
    lora_indices: torch.Tensor | None = field(
        default=None,
        metadata=row_input(
            absent=Absent.ZEROS,
            doc="per-session LoRAs [rows, slots] int32: the packed slot of each of the row's "
            "LoRAs (ModelBundle.loras; -1: none)",
        ),
    )
    lora_scales: torch.Tensor | None = field(
        default=None,
        metadata=row_input(
            absent=Absent.ZEROS,
            doc="per-session LoRA scales [rows, slots] float32; 0 turns that slot off",
        ),
    )

    bank_slots: torch.Tensor | None = field(
        default=None,
        metadata=row_input(
            absent=Absent.ZEROS,
            doc="feature bank slot per row [rows] (long); 0: the empty slot, no bank",
        ),
    )
    bank_frames: torch.Tensor | None = field(
        default=None,
        metadata=row_input(
            absent=Absent.ZEROS,
            doc="which of the slot's bank frames hold one [rows, F] (0/1); left out of a call "
            "with the other bank inputs: every row holds all F (unmasked attention)",
        ),
    )
    bank_write: torch.Tensor | None = field(
        default=None,
        metadata=row_input(
            absent=Absent.ZEROS,
            pad_zeros=True,
            doc="bank entry (slot * F + frame) this call's features go to [rows] (long); "
            "0 writes nowhere that is read",
        ),
    )
    bank_fusion: torch.Tensor | None = field(
        default=None,
        metadata=row_input(
            absent=Absent.ZEROS,
            doc="feature fusion strength (0: off) and cosine threshold per row [rows, 2]",
        ),
    )
    ip_tokens: torch.Tensor | None = field(
        default=None,
        metadata=row_input(
            absent=Absent.ZEROS,
            doc="IP-Adapter image-prompt tokens [rows, T, D] (the adapter's projection of the "
            "row's image; T and D are the loaded adapter's: ModelBundle.ip_adapter)",
        ),
    )
    ip_scales: torch.Tensor | None = field(
        default=None,
        metadata=row_input(
            absent=Absent.ZEROS,
            doc="IP-Adapter scale [rows]; 0 gives the row exactly the UNet without the adapter",
        ),
    )

    @property
    def rows(self) -> int:
        return int(self.latents.shape[0])

    @classmethod
    def row_fields(cls) -> tuple[str, ...]:
        """The names of the per-row fields, in declaration order."""
        return tuple(f.name for f in fields(cls) if f.metadata.get("row_input"))

    @classmethod
    def absent_rule(cls, name: str) -> Absent:
        return next(Absent(f.metadata["absent"]) for f in fields(cls) if f.name == name)

    @classmethod
    def pads_with_zeros(cls, name: str) -> bool:
        return next(bool(f.metadata.get("pad_zeros")) for f in fields(cls) if f.name == name)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for every per-row field that is set, in declaration order."""
        for name in self.row_fields():
            value = getattr(self, name)
            if value is not None:
                yield name, value

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> UNetBatch:
        """A batch of the same kind with ``fn`` applied to every per-row tensor that is set."""
        return replace(self, **{name: fn(tensor) for name, tensor in self.tensors()})

    def narrow(self, start: int, length: int) -> UNetBatch:
        """A view of ``length`` rows from ``start``."""
        return self.map_rows(lambda t: t.narrow(0, start, length))


def field_names_in(batches: Sequence[UNetBatch]) -> tuple[str, ...]:
    """The per-row fields set in any of ``batches``, checked against their :class:`Absent` rule.

    A field that some batches set and others leave ``None`` is allowed only when its rule is
    :attr:`Absent.ZEROS`; otherwise the scheduler must not have put those sessions together
    (:class:`~livediff.exceptions.BatchCompositionError`).
    """
    kind = type(batches[0])
    names = [n for n in kind.row_fields() if any(getattr(b, n) is not None for b in batches)]
    for name in names:
        missing = sum(getattr(b, name) is None for b in batches)
        if missing and kind.absent_rule(name) is not Absent.ZEROS:
            from livediff.exceptions import BatchCompositionError

            raise BatchCompositionError(
                f"{missing} of {len(batches)} sessions in one UNet call lack the per-row input "
                f"{name!r}, which every session of a call must send",
                field=name,
            )
    return tuple(names)


NoisePredictor = Callable[[UNetBatch], torch.Tensor]
