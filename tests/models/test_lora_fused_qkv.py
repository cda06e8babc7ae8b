"""Per-session LoRAs with fused q/k/v projections (models/lora_fusion.py) against their oracle.

The recipe's ``fuse_qkv`` step makes one ``to_qkv`` GEMM of a self-attention's three
projections (``to_kv`` of a cross-attention's two); with a LoRA library the fused layer adds
each row's LoRAs through one fused pair of buffers. The oracle is the same as for separate
projections: each row equals a UNet with that row's LoRAs fused into its weights (the equation
written out, tests/helpers/lora_testing.py), in fp32 on the CPU; and the fused UNet equals the
unfused library's output for the same rows.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

from helpers.lora_testing import (
    fused_copy,
    random_lora,
    save_kohya,
    save_peft,
    tiny_unet,
    unet_inputs,
    unet_only_bundle,
)
from livediff.exceptions import ModelLoadError
from livediff.models.backends import recipe_for
from livediff.models.fp8 import Fp8Compute, Fp8Linear, fits, install_fp8
from livediff.models.lora_layers import LoraRowsLinear
from livediff.models.lora_library import LoraLibrary
from livediff.models.lora_merge import MERGE_AFTER_CALLS, NO_LORAS
from livediff.models.lora_store import LoraCapacity
from livediff.models.recipe import Recipe, apply_recipe

TIGHT = {"rtol": 1e-5, "atol": 1e-5}
FUSE = Recipe(fuse_qkv=True, channels_last=False, compile=False, cudnn_benchmark=False)


@pytest.fixture(scope="module")
def base() -> Any:
    return tiny_unet(seed=0)


@pytest.fixture(scope="module")
def loras(base: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A: PEFT, rank 8, alpha 4, every layer; B: kohya, rank 4, every other layer (so some
    parts of a fused projection have no update: their blocks stay zero)."""
    folder = tmp_path_factory.mktemp("loras")
    a, b = random_lora(base, 8, 1), random_lora(base, 4, 2, every=2)
    return {
        "A": (a, 0.5, save_peft(a, folder / "a.safetensors", alpha=4.0)),
        "B": (b, 1.0, save_kohya(b, folder / "b.safetensors")),
    }


def _library(base: Any, loras: dict[str, Any], *, fused: bool, load: tuple[str, ...]) -> Any:
    """A library bundle, its projections fused by the recipe (or not), then ``load`` loaded."""
    unet = copy.deepcopy(base)
    library = LoraLibrary.attach(unet, LoraCapacity(max_rank=16))
    bundle = unet_only_bundle(unet).with_loras(library)
    if fused:
        apply_recipe(bundle, FUSE)
    for name in load:
        library.load(name, str(loras[name][2]))
    return library


@torch.no_grad()
def _call(library: LoraLibrary, uses: list[list[tuple[str, float]]], seed: int) -> torch.Tensor:
    inputs = unet_inputs(len(uses), seed=seed)
    with library.rows(*library.row_inputs(uses)):
        return library.unet(**inputs, return_dict=False)[0]


@torch.no_grad()
def _oracle(base: Any, loras: dict[str, Any], uses: list[list[tuple[str, float]]], seed: int):
    inputs = unet_inputs(len(uses), seed=seed)
    rows = []
    for row, use in enumerate(uses):
        unet = fused_copy(base, [(loras[n][0], s * loras[n][1]) for n, s in use])
        one = {k: v[row : row + 1] for k, v in inputs.items()}
        rows.append(unet(**one, return_dict=False)[0])
    return torch.cat(rows)


USES: list[list[tuple[str, float]]] = [[("A", 0.8)], [("B", 1.0), ("A", -0.4)], []]


def test_the_recipe_fuses_every_attention_with_its_lora_layers(
    base: Any, loras: dict[str, Any]
) -> None:
    library = _library(base, loras, fused=True, load=())
    attentions = [m for m in library.unet.modules() if isinstance(m, Attention)]
    assert attentions and all(m.fused_projections for m in attentions)
    assert all(isinstance(m.processor, FusedAttnProcessor2_0) for m in attentions)
    for attn in attentions:
        fused = attn.to_kv if attn.is_cross_attention else attn.to_qkv
        assert isinstance(fused, LoraRowsLinear)
        assert type(fused.base) is torch.nn.Linear
    assert len(library.store.fused) == len(attentions)
    # The parts beside a fused projection hold views of its pair (no second copy, never stale).
    for name, (a, b) in library.store.fused.items():
        attn = library.unet.get_submodule(name.rpartition(".")[0])
        for part in ("to_k", "to_v") if name.endswith("to_kv") else ("to_q", "to_k", "to_v"):
            layer = getattr(attn, part)
            assert layer.a.untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
            assert layer.b.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_fused_rows_equal_each_row_with_its_loras_fused(base: Any, loras: dict[str, Any]) -> None:
    """LoRAs loaded after the fusion write through the parts' views into the fused pairs."""
    library = _library(base, loras, fused=True, load=("A", "B"))
    batched = _call(library, USES, seed=5)
    torch.testing.assert_close(batched, _oracle(base, loras, USES, seed=5), **TIGHT)
    unfused = _library(base, loras, fused=False, load=("A", "B"))
    torch.testing.assert_close(batched, _call(unfused, USES, seed=5), **TIGHT)
    plain = _oracle(base, loras, [[], [], []], seed=5)
    assert (batched[:2] - plain[:2]).abs().amax() > 1e-2  # the LoRAs show: the test can fail


def test_loras_loaded_before_the_fusion_are_kept(base: Any, loras: dict[str, Any]) -> None:
    unet = copy.deepcopy(base)
    library = LoraLibrary.attach(unet, LoraCapacity(max_rank=16))
    library.load("A", str(loras["A"][2]))
    apply_recipe(unet_only_bundle(unet).with_loras(library), FUSE)
    library.load("B", str(loras["B"][2]))
    torch.testing.assert_close(
        _call(library, USES, seed=6), _oracle(base, loras, USES, seed=6), **TIGHT
    )


def test_unloading_zeroes_the_fused_blocks(base: Any, loras: dict[str, Any]) -> None:
    library = _library(base, loras, fused=True, load=("A", "B"))
    slot = library.store.get("A").slot
    library.unload("A")
    assert all(a[slot].abs().amax() == 0 for a, _ in library.store.fused.values())
    assert all(b[slot].abs().amax() == 0 for _, b in library.store.fused.values())
    uses: list[list[tuple[str, float]]] = [[("B", 1.0)], []]
    torch.testing.assert_close(
        _call(library, uses, seed=7), _oracle(base, loras, uses, seed=7), **TIGHT
    )


def test_the_fused_pairs_are_block_diagonal(base: Any, loras: dict[str, Any]) -> None:
    """Part i's rank rows write only its own outputs: the zeros off the diagonal stay zero."""
    library = _library(base, loras, fused=True, load=("A", "B"))
    rank = library.capacity.max_rank
    checked = 0
    for name, (_, b) in library.store.fused.items():
        parts = 2 if name.endswith("to_kv") else 3
        width = b.shape[2] // parts
        for i in range(parts):
            rows = b[:, i * rank : (i + 1) * rank]
            outside = torch.cat([rows[..., : i * width], rows[..., (i + 1) * width :]], dim=-1)
            assert outside.abs().amax() == 0, name
            assert rows[..., i * width : (i + 1) * width].abs().amax() > 0, name
            checked += 1
    assert checked > 0


def test_the_slot_size_counts_the_fused_buffers(base: Any, loras: dict[str, Any]) -> None:
    unfused = _library(base, loras, fused=False, load=())
    fused = _library(base, loras, fused=True, load=())
    extra = 0  # the off-diagonal blocks of every fused b
    for name, (_, b) in fused.store.fused.items():
        parts = 2 if name.endswith("to_kv") else 3
        extra += b[0].numel() - b[0].numel() // parts
    assert fused.store.slot_bytes == unfused.store.slot_bytes + extra * 4  # fp32


def test_merged_calls_fold_into_the_fused_weights(base: Any, loras: dict[str, Any]) -> None:
    """A lone session's LoRAs merge into the fused layers (the ones the UNet calls), equal the
    oracle, and go back bit for bit when the rows stop agreeing."""
    library = _library(base, loras, fused=True, load=("A", "B"))
    called = [m for m in library.unet.modules() if isinstance(m, LoraRowsLinear)]
    original = {id(m): m.base.weight.clone() for m in called}
    uses = [[("A", 0.7), ("B", 0.5)]]
    bundle = unet_only_bundle(library.unet).with_loras(library)
    key = library.merge_key(uses[0])
    for call in range(MERGE_AFTER_CALLS):
        merged = library.merge.plan([key])
        assert merged == (call + 1 == MERGE_AFTER_CALLS)
    assert library.merge.merged == key
    inputs = unet_inputs(1, seed=8)
    with torch.no_grad():
        eps = bundle.unet(**inputs, return_dict=False)[0]  # no LoRA inputs: the weights hold them
    torch.testing.assert_close(eps, _oracle(base, loras, uses, seed=8), **TIGHT)
    assert library.merge.plan([key, library.merge_key([])]) is False
    assert library.merge.merged == NO_LORAS
    assert all(torch.equal(original[id(m)], m.base.weight) for m in called)


def test_fp8_converts_the_fused_bases_and_leaves_the_unused_parts(
    base: Any, loras: dict[str, Any]
) -> None:
    library = _library(base, loras, fused=True, load=())
    install_fp8(library.unet, compute=Fp8Compute.REFERENCE)
    converted = 0
    for name, module in library.unet.named_modules():
        if not isinstance(module, LoraRowsLinear):
            continue
        unused_part = name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") and (
            ".attn1." in f".{name}" or not name.endswith("to_q")
        )
        if unused_part:
            assert not isinstance(module.base, Fp8Linear), name
        elif isinstance(module.base, torch.nn.Linear):  # kept: a width fp8 does not take
            assert not fits(module.base), name
        else:
            assert isinstance(module.base, Fp8Linear), name
            converted += name.endswith(("to_qkv", "to_kv"))
    assert converted > 0  # fused bases of widths multiple of 16 were converted


def test_the_default_recipe_fuses_when_the_ranks_fit(base: Any) -> None:
    for rank, fuses in ((64, True), (85, True), (86, False), (128, False)):
        unet = copy.deepcopy(base)
        bundle = unet_only_bundle(unet).with_loras(
            LoraLibrary.attach(unet, LoraCapacity(max_rank=rank))
        )
        assert recipe_for(bundle).fuse_qkv is fuses, rank
    assert recipe_for(unet_only_bundle(copy.deepcopy(base))).fuse_qkv


def test_fusing_twice_or_a_mixed_attention_is_refused(base: Any, loras: dict[str, Any]) -> None:
    library = _library(base, loras, fused=True, load=())
    with pytest.raises(ModelLoadError, match="fused already"):
        library.fuse_projections()
    unet = copy.deepcopy(base)
    library = LoraLibrary.attach(unet, LoraCapacity(max_rank=16))
    attn = next(m for m in unet.modules() if isinstance(m, Attention))
    attn.to_k = attn.to_k.base  # a projection without its LoRA layer
    with pytest.raises(ModelLoadError, match="some of to_q, to_k, to_v carry LoRA layers"):
        library.fuse_projections()


def test_a_lora_file_path_is_still_refused_for_shapes_after_fusion(
    base: Any, loras: dict[str, Any], tmp_path: Path
) -> None:
    """The parts keep their names and shapes: a LoRA of other widths is refused as before."""
    library = _library(base, loras, fused=True, load=())
    other = random_lora(tiny_unet(seed=0, cross_attention_dim=32), 4, 9)
    path = save_peft(other, tmp_path / "other.safetensors")
    with pytest.raises(ModelLoadError):
        library.load("other", str(path))
    assert library.names() == ()


@pytest.mark.slow  # dynamo traces the whole tiny UNet
def test_loading_into_fused_pairs_never_recompiles(base: Any, loras: dict[str, Any]) -> None:
    torch._dynamo.reset()
    library = _library(base, loras, fused=True, load=("A",))
    compiled = torch.compile(library.unet.forward, fullgraph=True, backend="aot_eager")
    inputs = unet_inputs(2, seed=9)
    steps: list[list[list[tuple[str, float]]]] = [[[("A", 1.0)], []], [[("A", 0.5)], [("B", 0.7)]]]
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for index, uses in enumerate(steps):
            if index == 1:
                library.load("B", str(loras["B"][2]))
            with library.rows(*library.row_inputs(uses)):
                result = compiled(**inputs, return_dict=False)[0]
            torch.testing.assert_close(result, _oracle(base, loras, uses, seed=9), **TIGHT)
    torch._dynamo.reset()


def test_a_library_too_large_to_fuse_keeps_separate_projections_and_says_so(
    base: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The eager backend never fuses; the compile backend's recipe for a library of max_rank
    86 (3 × 86 > 256) keeps q/k/v separate and logs it (here: its recipe, as prepare_backend
    picks it, applied without compiling: this CPU has no CUDA)."""
    from livediff.models import backends

    caplog.set_level(logging.INFO, logger="livediff.models.backends")
    unet = copy.deepcopy(base)
    library = LoraLibrary.attach(unet, LoraCapacity(max_rank=86))
    bundle = unet_only_bundle(unet).with_loras(library)
    applied: list[Recipe] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends, "apply_recipe", lambda b, r: applied.append(r) or b)
        patch.setattr(backends, "_report_kernels", lambda b, needs_triton: None)
        backends.prepare_backend(bundle, backends.Backend.COMPILE)
    assert [r.fuse_qkv for r in applied] == [False]
    assert any("keeps q/k/v separate" in r.getMessage() for r in caplog.records)
    assert not library.store.fused
