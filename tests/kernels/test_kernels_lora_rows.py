"""The segmented LoRA op (``livediff::lora_rows_add``) on CPU: its reference against a float64
row-by-row loop, its argument checks, opcheck, and torch.compile tracing it whole without a
recompile when rows switch LoRAs. The Triton kernel's parity is in the interpreter and GPU tests.
"""

from __future__ import annotations

import pytest
import torch
from kernels_testing import lora_rows_inputs, naive_lora_rows

from livediff.exceptions import KernelInputError
from livediff.kernels.lora_rows import lora_rows

RANKS = [4, 8, 16, 32, 64, 128]
UNTOUCHED_ROWS = (0, 5)  # no LoRA, and a LoRA at scale 0


@pytest.mark.parametrize("rank", RANKS)
def test_reference_matches_a_row_by_row_loop(rank: int) -> None:
    inputs = lora_rows_inputs(rank, seed=rank)
    expected = naive_lora_rows(**inputs)
    out = lora_rows(
        inputs["x"],
        inputs["a"],
        inputs["b"],
        inputs["indices"],
        inputs["scales"],
        out=inputs["out"].clone(),
    )
    torch.testing.assert_close(out.to(torch.float64), expected, rtol=1e-5, atol=1e-5)
    for row in UNTOUCHED_ROWS:
        assert torch.equal(out[row], inputs["out"][row])
    assert not torch.allclose(out[1], inputs["out"][1])  # the LoRA rows did change


def test_half_precision_rounds_once() -> None:
    inputs = lora_rows_inputs(16, dtype=torch.float16, seed=3)
    expected = naive_lora_rows(**inputs)
    out = lora_rows(**{k: v for k, v in inputs.items() if k != "out"}, out=inputs["out"].clone())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.to(torch.float64), expected, rtol=2e-3, atol=2e-3)


def test_one_token_rows_and_a_fresh_output() -> None:
    inputs = lora_rows_inputs(8, tokens=1, seed=4)
    flat = inputs["x"][:, 0]
    out = lora_rows(flat, inputs["a"], inputs["b"], inputs["indices"], inputs["scales"])
    expected = naive_lora_rows(**{**inputs, "out": torch.zeros_like(inputs["out"])})
    assert out.shape == (6, 72)
    torch.testing.assert_close(out.to(torch.float64), expected[:, 0], rtol=1e-5, atol=1e-5)


def test_switching_a_rows_lora_is_writing_its_index() -> None:
    inputs = lora_rows_inputs(16, seed=5)
    args = _without(inputs, "out")
    before = lora_rows(**args)
    args["indices"][1, 0] = 2
    after = lora_rows(**args)
    expected = naive_lora_rows(torch.zeros_like(inputs["out"]), **args)
    torch.testing.assert_close(after.to(torch.float64), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before[1], after[1])
    torch.testing.assert_close(before[2:], after[2:], rtol=0, atol=0)


def _without(inputs: dict[str, torch.Tensor], *names: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in inputs.items() if k not in names}


BAD_CASES = [
    ("x", lambda i: {**i, "x": i["x"][0]}),
    ("a", lambda i: {**i, "a": i["a"][:, :-1]}),
    ("b", lambda i: {**i, "b": i["b"][:, :-1]}),
    ("out", lambda i: {**i, "out": i["out"][:, :, :-1]}),
    ("indices", lambda i: {**i, "indices": i["indices"].float()}),
    ("indices", lambda i: {**i, "indices": i["indices"][:-1]}),
    ("scales", lambda i: {**i, "scales": i["scales"][:, :1]}),
    ("b", lambda i: {**i, "b": i["b"].double()}),
]


@pytest.mark.parametrize(("field", "change"), BAD_CASES)
def test_bad_arguments_name_the_argument(field: str, change: object) -> None:
    args = change(lora_rows_inputs(4))  # type: ignore[operator]
    with pytest.raises(KernelInputError) as caught:
        torch.ops.livediff.lora_rows_add(
            args["out"], args["x"], args["a"], args["b"], args["indices"], args["scales"]
        )
    assert caught.value.field == field


@pytest.mark.parametrize("rank", [4, 64])
def test_opcheck(rank: int) -> None:
    i = lora_rows_inputs(rank)
    args = (i["out"], i["x"], i["a"], i["b"], i["indices"], i["scales"])
    torch.library.opcheck(torch.ops.livediff.lora_rows_add.default, args)


class _LoraLinear(torch.nn.Module):
    """A linear layer plus the segmented update, as the UNet's wrapped layers compute it."""

    def __init__(self, inputs: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.base = torch.nn.Linear(inputs["a"].shape[1], inputs["b"].shape[2])
        self.register_buffer("a", inputs["a"])
        self.register_buffer("b", inputs["b"])

    def forward(self, x: torch.Tensor, indices: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return lora_rows(x, self.a, self.b, indices, scales, out=self.base(x))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiles_as_one_graph_and_switches_without_recompiling(backend: str) -> None:
    torch._dynamo.reset()
    inputs = lora_rows_inputs(16, seed=6)
    layer = _LoraLinear(inputs).eval()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x, indices, scales = inputs["x"], inputs["indices"].clone(), inputs["scales"].clone()
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for step in range(4):
            indices.copy_(indices.roll(step, 0))
            scales.copy_(scales.roll(step, 0) * (1 + step))
            layer.a.mul_(1.1)  # a LoRA loaded into the packed buffer: written in place
            result = compiled(x, indices, scales)
            torch.testing.assert_close(result, layer(x, indices, scales), rtol=1e-6, atol=1e-6)
    explanation = torch._dynamo.explain(layer)(x, indices, scales)
    assert explanation.graph_break_count == 0
    assert "lora_rows_add" in str(explanation.graphs[0].graph)
