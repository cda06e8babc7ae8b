"""FP8 GEMMs for the denoisers' transformer linears: the recipe's opt-in ``precision=fp8`` step.

:func:`install_fp8` replaces the ``nn.Linear`` layers of a UNet's (or ControlNet's) transformer
blocks — attention ``to_q``/``to_k``/``to_v``/``to_out.0`` and the fused ``to_qkv``/``to_kv``
the recipe's fuse-QKV step makes, the feed-forward's two linears and the linear
``proj_in``/``proj_out`` — by :class:`Fp8Linear`:

- the weight is quantized once, here, to ``float8_e4m3fn`` with one float32 scale per output
  channel (its amax / 448, e4m3's largest finite value);
- each call quantizes its activation per row (per token): amax over the features, a float32
  scale, clamp, cast (:func:`quantize_rows`). These are plain ops: under ``torch.compile``
  Inductor fuses them into one reduction kernel, next to the op that made the activation;
- one ``torch._scaled_mm`` with row-wise scales (``scale_a`` ``[M, 1]``, ``scale_b`` ``[1, N]``),
  the bias in its epilogue and the output in the model's dtype. A 3-D or 4-D activation is
  read as ``[M, K]`` rows and the output shaped back.

What ``torch._scaled_mm`` takes (PyTorch's ``ScaledBlas.cpp``): row-wise scaling runs on CUDA
devices of compute capability 8.9 and newer — cuBLASLt's outer-vector scaling on sm90 with
cuBLAS 12.9+ (torch 2.9+ on CUDA 12.9/13 builds), PyTorch's CUTLASS kernel elsewhere. Both
give bf16 or fp16 output (the CUTLASS path fp16 only since torch 2.10), so fp8 keeps the
model's dtype: fp16 or bf16. A bias must be in the output dtype, and float32 output takes no
bias, so fp32 models are refused. The first operand must be row-major and the second
column-major (our row-major ``[N, K]`` weight transposed, a view), K and N multiples of 16: a
target layer of other widths stays in the model's dtype and is counted (:class:`Fp8Report`).

Not converted: linears outside the transformer blocks (time embedding, the ResNets' time
projections, SDXL's added embedding; their rows are the batch's, a handful), convolutions (no
FP8 convolution here), the attention itself (SDPA) and the VAE (TAESD is all convolutions).
An IP-Adapter's own key/value projections stay in the model's dtype; its processors and the
feature bank's call the converted projections like any others. A per-session LoRA layer
(:class:`~livediff.models.lora_layers.LoraRowsLinear`) keeps its update in the model's dtype
around an FP8 base layer.

:attr:`Fp8Compute.REFERENCE` dequantizes and multiplies in float32 instead of calling
``torch._scaled_mm``: the same quantization, on any device (CPU tests, the emulated bench).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from livediff.exceptions import BackendError, ParameterError

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
AMAX_FLOOR = 1e-12  # an all-zero row or channel gets a tiny scale, not a division by zero
ALIGNMENT = 16  # torch._scaled_mm: K and N multiples of 16
MIN_CAPABILITY = (8, 9)  # Ada; Hopper is 9.0
OUT_DTYPES = (torch.float16, torch.bfloat16)
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "to_qkv", "to_kv")
TARGET_SUFFIXES = (
    *(f".attn{i}.{name}" for i in (1, 2) for name in _ATTENTION),
    ".ff.net.0.proj",  # GEGLU / GELU input projection
    ".ff.net.2",
    ".proj_in",
    ".proj_out",
)
WRAPPER_SUFFIX = ".base"  # a per-session LoRA layer keeps its base layer as ``base``


class Fp8Compute(str, Enum):
    """How an :class:`Fp8Linear` multiplies: ``torch._scaled_mm``, or the float32 reference."""

    SCALED_MM = "scaled_mm"
    REFERENCE = "reference"


def _quantize(values: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 scales (amax / 448) along ``dim``: values ≈ q · scale."""
    amax = values.abs().amax(dim=dim, keepdim=True).float()
    scale = amax.clamp(min=AMAX_FLOOR) / E4M3_MAX
    quantized = (values.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)
    return quantized, scale


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear's ``[N, K]`` weight → (e4m3 ``[N, K]``, float32 scales ``[1, N]``), one scale
    per output channel."""
    quantized, scale = _quantize(weight, dim=1)
    return quantized, scale.reshape(1, -1).contiguous()


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations ``[M, K]`` → (e4m3 ``[M, K]``, float32 scales ``[M, 1]``), one per row."""
    return _quantize(rows, dim=-1)


def dequantized_mm(
    rows: torch.Tensor,
    row_scale: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """What ``torch._scaled_mm`` computes, in float32: (q_a · s_a) @ (q_w · s_w)ᵀ + bias."""
    a = rows.float() * row_scale
    w = weight.float() * weight_scale.reshape(-1, 1)
    out = a @ w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


class Fp8Linear(torch.nn.Module):
    """A linear layer whose GEMM runs in FP8 with per-row scales (see the module docstring).

    Its tensors are buffers, not parameters: a model's ``dtype`` stays its first parameter's,
    and nothing trains them. It has no ``weight`` on purpose: code that would read one (QKV
    fusion) must run before the conversion, and fails loudly after it.
    """

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        weight_fp8: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        out_dtype: torch.dtype,
        compute: Fp8Compute = Fp8Compute.SCALED_MM,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = (int(n) for n in weight_fp8.shape)
        self.out_dtype = out_dtype
        self.compute = Fp8Compute(compute)
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", None if bias is None else bias.to(out_dtype).contiguous())

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls, linear: torch.nn.Linear, compute: Fp8Compute = Fp8Compute.SCALED_MM
    ) -> Fp8Linear:
        weight, scale = quantize_weight(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(weight, scale, bias, out_dtype=linear.weight.dtype, compute=compute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, row_scale = quantize_rows(x.reshape(-1, self.in_features))
        if self.compute is Fp8Compute.SCALED_MM:
            out = torch._scaled_mm(
                # row-major, as the GEMM requires: a [M, K] view of a permuted activation
                # (proj_in's) is column-major, and the cast keeps its strides (H200: refused)
                rows.contiguous(),
                self.weight_fp8.t(),  # [K, N] column-major: the layout the GEMM takes
                scale_a=row_scale,
                scale_b=self.weight_scale,
                bias=self.bias,
                out_dtype=self.out_dtype,
            )
        else:
            out = dequantized_mm(
                rows, row_scale, self.weight_fp8, self.weight_scale, self.bias, self.out_dtype
            )
        return out.reshape(*x.shape[:-1], self.out_features)

    def weight_bytes(self) -> int:
        return self.weight_fp8.numel() * self.weight_fp8.element_size() + 4 * self.out_features

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, out_dtype={self.out_dtype}, compute={self.compute.value}"
        )


@dataclass(frozen=True)
class Fp8Report:
    """A network's linears after :func:`install_fp8`, by module name."""

    converted: tuple[str, ...]
    kept_widths: tuple[str, ...]  # transformer linears whose K or N is not a multiple of 16
    kept_other: tuple[str, ...]  # other linears (embeddings, time projections, adapters')
    bytes_before: int  # the converted layers' weights in the model's dtype
    bytes_after: int  # their e4m3 weights and float32 scales
    # The separate q/k/v projections diffusers keeps beside a fused to_qkv / to_kv, which no
    # call reads: left as they are, counted neither as converted nor as kept.
    unused: tuple[str, ...] = ()

    @property
    def layers_fp8(self) -> int:
        return len(self.converted)

    @property
    def layers_kept(self) -> int:
        return len(self.kept_widths) + len(self.kept_other)

    def describe(self) -> str:
        return (
            f"{self.layers_fp8} linears as FP8 GEMMs (weights {self.bytes_before / 2**20:.1f} → "
            f"{self.bytes_after / 2**20:.1f} MiB); kept in the model's dtype: "
            f"{len(self.kept_widths)} of widths not a multiple of {ALIGNMENT}, "
            f"{len(self.kept_other)} outside the transformer projections"
            + (f"; {len(self.unused)} unused beside fused projections" if self.unused else "")
        )


def is_target(name: str) -> bool:
    """Whether the module named ``name`` is a transformer linear fp8 converts."""
    name = name.removesuffix(WRAPPER_SUFFIX)
    return ("." + name).endswith(TARGET_SUFFIXES)


def fits(linear: torch.nn.Linear) -> bool:
    return linear.in_features % ALIGNMENT == 0 and linear.out_features % ALIGNMENT == 0


def unused_projections(net: torch.nn.Module) -> frozenset[str]:
    """The projections a fused attention no longer calls: ``to_q``/``to_k``/``to_v`` beside a
    self-attention's ``to_qkv``, ``to_k``/``to_v`` beside a cross-attention's ``to_kv``
    (diffusers' ``fuse_projections`` keeps them; its fused processors read only ``to_q``)."""
    names = []
    for name, module in net.named_modules():
        if getattr(module, "fused_projections", False):
            cross = getattr(module, "is_cross_attention", False)
            separate = ("to_k", "to_v") if cross else ("to_q", "to_k", "to_v")
            names += [f"{name}.{child}" if name else child for child in separate]
    return frozenset(names)


def install_fp8(net: torch.nn.Module, *, compute: Fp8Compute = Fp8Compute.SCALED_MM) -> Fp8Report:
    """Replace ``net``'s target linears of fitting widths by :class:`Fp8Linear` (in place).

    Run it after the weights have their dtype and device, and after QKV fusion (which reads
    the linears' weights); the separate projections a fused attention no longer calls stay
    as they are. Layers already converted are left as they are.
    """
    unused = unused_projections(net)
    for name, module in list(net.named_modules()):
        if name.removesuffix(WRAPPER_SUFFIX) in unused:  # a LoRA layer's base beside a fused one
            continue
        if isinstance(module, torch.nn.Linear) and is_target(name) and fits(module):
            parent_name, _, child = name.rpartition(".")
            parent = net.get_submodule(parent_name) if parent_name else net
            setattr(parent, child, Fp8Linear.from_linear(module, compute))
    return fp8_report(net)


def fp8_report(net: torch.nn.Module) -> Fp8Report:
    """What :func:`install_fp8` converted in ``net`` and what it kept, read from its modules."""
    converted: list[str] = []
    widths: list[str] = []
    other: list[str] = []
    before = after = 0
    unused = unused_projections(net)
    for name, module in net.named_modules():
        if name.removesuffix(WRAPPER_SUFFIX) in unused:
            continue
        if isinstance(module, Fp8Linear):
            converted.append(name)
            item = torch.empty((), dtype=module.out_dtype).element_size()
            before += module.in_features * module.out_features * item
            after += module.weight_bytes()
        elif isinstance(module, torch.nn.Linear):
            (widths if is_target(name) else other).append(name)
    return Fp8Report(
        tuple(converted), tuple(widths), tuple(other), before, after, tuple(sorted(unused))
    )


def check_fp8_device(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse fp8 where ``torch._scaled_mm`` cannot run it: not CUDA, compute capability below
    8.9, or a dtype other than fp16 / bf16 (cheap: no GEMM is run)."""
    if device.type != "cuda":
        raise BackendError(
            "--precision fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper, "
            f"Blackwell); this model is on {device}. Use --precision native."
        )
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        raise BackendError(
            f"--precision fp8 needs a CUDA GPU of compute capability 8.9 or newer; {device} is "
            f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}. "
            "Use --precision native."
        )
    if dtype not in OUT_DTYPES:
        raise ParameterError(
            f"--precision fp8 writes its GEMMs' output in the model's dtype, fp16 or bf16; this "
            f"model is {str(dtype).removeprefix('torch.')}: use --dtype fp16 or bf16",
            field="precision",
        )


def check_fp8_support(device: torch.device, dtype: torch.dtype) -> None:
    """:func:`check_fp8_device`, then one tiny row-wise FP8 GEMM with a bias in ``dtype``: this
    torch build must run what every :class:`Fp8Linear` will (refused at start, not mid-stream)."""
    check_fp8_device(device, dtype)
    # Fixed values, not random ones: the probe leaves the device's random state alone.
    values = torch.linspace(-1, 1, ALIGNMENT * ALIGNMENT * 2, device=device, dtype=dtype)
    weight = values.view(ALIGNMENT, ALIGNMENT * 2)
    quantized, scale = quantize_weight(weight)
    probe = Fp8Linear(quantized, scale, weight[:, 0], out_dtype=dtype)
    try:
        probe(weight[:3])
    except RuntimeError as exc:  # said at start-up, with what to do; nothing falls back
        raise BackendError(
            f"torch {torch.__version__} cannot run a row-wise scaled FP8 GEMM with "
            f"{str(dtype).removeprefix('torch.')} output on {torch.cuda.get_device_name(device)}"
            f" ({exc}); try --dtype bf16, or --precision native"
        ) from exc
