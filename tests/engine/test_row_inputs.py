"""The per-row structure of a shared batch: a new per-row input is a field, not batching code.

:class:`~livediff.models.unet_batch.UNetBatch` declares its per-row fields; the batcher packs,
pads and splits whatever fields a batch sets, writes them straight into a model's static input
buffers when it has them, and applies each field's rule for sessions that do not set it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from livediff.engine.batch_packing import BatchPacker
from livediff.exceptions import BatchCompositionError
from livediff.models.unet_batch import Absent, UNetBatch, row_input


@dataclass(frozen=True)
class ScaledBatch(UNetBatch):
    """A made-up per-row input: a per-row scale a model multiplies its answer by."""

    scale: torch.Tensor | None = field(
        default=None, metadata=row_input(absent=Absent.ZEROS, doc="answer scale [rows]")
    )
    tag: torch.Tensor | None = field(default=None, metadata=row_input(doc="[rows], must be sent"))
    note: str = "not a per-row field"


def rows(n: int, value: float, *, scale: float | None = None) -> ScaledBatch:
    return ScaledBatch(
        torch.full((n, 4, 2, 2), value),
        torch.full((n,), int(value)),
        torch.zeros(n, 77, 8),
        scale=None if scale is None else torch.full((n,), scale),
    )


def scaled_model(seen: list[Any], buffers: dict[str, torch.Tensor] | None = None) -> Any:
    def predict_noise(batch: ScaledBatch) -> torch.Tensor:
        seen.append(batch)
        assert batch.scale is not None
        return batch.latents * batch.scale[:, None, None, None]

    def input_buffers(stage: str, bucket: int, like: dict[str, torch.Tensor]) -> Any:
        if buffers is None or stage != "unet":
            return None
        for name, template in like.items():  # what a graphed model keeps per bucket
            buffers.setdefault(
                name, torch.empty((bucket, *template.shape[1:]), dtype=template.dtype)
            )
        return {name: buffers[name] for name in like}

    return SimpleNamespace(
        device=torch.device("cpu"), predict_noise=predict_noise, input_buffers=input_buffers
    )


def test_a_new_per_row_field_is_packed_padded_and_split_without_batching_code() -> None:
    assert ScaledBatch.row_fields() == (
        "latents",
        "timesteps",
        "embeds",
        "text_embeds",
        "time_ids",
        "control_images",
        "control_scales",
        "lora_indices",
        "lora_scales",
        "bank_slots",
        "bank_frames",
        "bank_write",
        "bank_fusion",
        "ip_tokens",
        "ip_scales",
        "scale",
        "tag",
    )
    seen: list[Any] = []
    batcher = BatchPacker(scaled_model(seen), (1, 2, 4, 8))
    eps, call = batcher.predict([rows(1, 3.0, scale=2.0), rows(2, 5.0), rows(1, 7.0, scale=0.5)])
    (packed,) = seen
    assert isinstance(packed, ScaledBatch) and packed.rows == 4 == call.padded_rows
    assert packed.scale is not None and packed.scale.tolist() == [2.0, 0.0, 0.0, 0.5]
    expected = [
        torch.full((1, 4, 2, 2), 6.0),
        torch.zeros(2, 4, 2, 2),
        torch.full((1, 4, 2, 2), 3.5),
    ]
    assert all(torch.equal(e, x) for e, x in zip(eps, expected, strict=True))
    assert packed.note == "not a per-row field"  # other fields keep their defaults


def test_a_field_every_session_must_send_refuses_a_mixed_call() -> None:
    batcher = BatchPacker(scaled_model([]), (1, 2, 4))
    tagged = ScaledBatch(**{**rows(1, 1.0, scale=1.0).__dict__, "tag": torch.ones(1)})
    with pytest.raises(BatchCompositionError, match="'tag'") as refused:
        batcher.predict([tagged, rows(1, 2.0, scale=1.0)])
    assert refused.value.field == "tag"


def test_rows_are_packed_straight_into_a_models_static_inputs() -> None:
    seen: list[Any] = []
    buffers: dict[str, torch.Tensor] = {}
    batcher = BatchPacker(scaled_model(seen, buffers), (1, 2, 4))
    batcher.predict([rows(1, 3.0, scale=1.0), rows(2, 4.0, scale=1.0)])
    batcher.predict([rows(2, 1.0, scale=1.0), rows(1, 2.0, scale=1.0)])
    for batch in seen:  # the model was handed its own buffers: packing was the only copy
        for name, tensor in batch.tensors():
            assert tensor.data_ptr() == buffers[name].data_ptr(), name
    assert seen[1].latents[:, 0, 0, 0].tolist() == [1.0, 1.0, 2.0, 1.0]  # row 3 pads with row 0
