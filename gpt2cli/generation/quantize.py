"""Faster weights for decoding: weight-only int8 and int4 quantization and batch-1 matrix-vector products
(gpt-fast style).

All swap the model's `nn.Linear` modules in place and keep their parameters (so the tied output head stays tied
where it is not quantized); `gpt2 sample`, `gpt2 eval`, `gpt2 bench` and `gpt2 serve` use the same code.

Which kernel runs where is the device rules' choice (`runtime/device_rules.py`); the kernel calls themselves are
functions of the device type (`int8_matmul`, `pack_int4`, `int4_matmul`), so that tests run the CUDA and MPS calls
on fake tensors on a CPU-only build. Those paths reshape with views (`view`, `unbind`, `narrow`, `unsqueeze`) and
never call `.contiguous()` on a strided view: Python indexing and that method take a device guard, which such a
build lacks even for fake tensors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from gpt2cli.errors import UsageError
from gpt2cli.model.gpt2 import GPT2
from gpt2cli.runtime.device_rules import DeviceRules
from gpt2cli.runtime.devices import device_rules
from gpt2cli.settings.types import GROUP_SIZES


@dataclass
class QuantizeSummary:
    """What `quantize_model` did: the mode, the layers of each kind, and the layers int4 could not take (width not
    a multiple of the group size), which became int8 or kept their float weights."""

    mode: str
    group_size: int | None = None
    layers: dict[str, int] = field(default_factory=dict)  # kind ("int4", "int8", "float") -> count; none are 0
    fallback: list[str] = field(default_factory=list)
    fallback_kind: str = "int8"  # or "float" where int8 would run slower than float

    def describe(self) -> str:
        if self.mode == "none":
            return "not quantized"
        counts = ", ".join(f"{count} {kind}" for kind, count in self.layers.items())
        text = f"{self.mode}" + (f" (group size {self.group_size})" if self.group_size else "") + f": {counts} layers"
        width = f"{len(self.fallback)} whose width does not divide by {self.group_size}"
        if self.fallback and self.fallback_kind == "int8":
            text += f"; int8 for {width}"
        elif self.fallback:
            text += f"; float weights kept for {width} (int8 would run slower than float here)"
        return text

    def as_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "group_size": self.group_size, "layers": self.layers, "fallback": self.fallback}


def check_quantize_runs(mode: str, device: torch.device, compiled: bool, group_size: int, *, decode: bool) -> None:
    """Refuse (exit 2) a quantization that cannot run, or not fast, on this device, before any weights are read.

    `decode`: the weights run a batch-1 decode loop (sample, serve, bench), where int8 that rebuilds float weights
    every step (CUDA's `fused` candidate uncompiled, `devices.int8_runs_fast`) is slower than float and refused.
    Scoring passes (eval) multiply many rows per weight read, so that rule does not apply."""
    from gpt2cli.runtime.devices import check_int8_runs_fast

    if mode == "int8" and decode:
        check_int8_runs_fast(device, compiled)
    elif mode == "int4":
        check_group_size(group_size)
        check_int4_runs(device)


def quantize_model(model: GPT2, mode: str, group_size: int = 32, *, int8_fallback: bool = True) -> QuantizeSummary:
    """Quantize every Linear (the projections and the output head) in place: `none`, `int8` or `int4`.

    Under int4 a layer whose width does not divide by the group size becomes int8, or keeps its float weights where
    `int8_fallback` is False: where int8 decodes slower than float (`devices.int8_runs_fast`)."""
    if mode == "none":
        return QuantizeSummary("none")
    rules = device_rules(next(model.parameters()).device)
    if mode == "int8":
        quantize_int8(model, rules)
        return QuantizeSummary("int8", layers={"int8": _count(model, Int8Linear)})
    check_group_size(group_size)
    summary = QuantizeSummary("int4", group_size, fallback_kind="int8" if int8_fallback else "float")
    for parent_name, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, torch.nn.Linear):
                continue
            if _int4_fits(child.in_features, group_size, rules):
                setattr(module, name, Int4Linear.from_linear(child, group_size))
                continue
            if int8_fallback:
                setattr(module, name, Int8Linear.from_linear(child, rules))
            summary.fallback.append(f"{parent_name}.{name}".lstrip("."))
    counts = {
        "int4": _count(model, Int4Linear),
        "int8": _count(model, Int8Linear),
        "float": _count(model, torch.nn.Linear),
    }
    summary.layers = {kind: count for kind, count in counts.items() if count}  # "0 int8 layers" says nothing
    return summary


def _int4_fits(width: int, group_size: int, rules: DeviceRules) -> bool:
    return width % group_size == 0 and (rules.int4_kernel != "tinygemm" or tinygemm_packs(width))


def _count(model: torch.nn.Module, kind: type) -> int:
    return sum(isinstance(module, kind) for module in model.modules())


def decode_bytes_per_token(model: GPT2, rows: int = 1, compiled: bool = False) -> int:
    """Bytes a decode step of `rows` rows reads: every weight, scale and bias once, except the embedding tables, of
    which it reads one row (the tied head, a Linear, is counted through the head). Of an int8 layer's two copies of
    its scales, only the one its kernel reads counts; where its kernel first writes a float copy of the weights
    (`Int8Linear.dequantized_bytes`), the matmul reads that copy too."""
    seen: dict[int, int] = {}
    copies = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if isinstance(module, Int8Linear):
            tensors = module.tensors_read()
            copies += module.dequantized_bytes(rows, compiled)
        for tensor in tensors:
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values()) + copies


def one_row_on_cpu(x: torch.Tensor) -> bool:
    """A batch-1 decode step's input: one row of activations on the CPU."""
    return x.numel() == x.size(-1) and x.device.type == "cpu"


def compiled_matvec(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`weight` `(N, K)` times one row `x` as a float32 reduction, written for Inductor: it becomes one streaming
    loop over the weight (converted from int8 or bf16 as it is read), which on a 2-core EPYC read float32 weights
    2.4x faster than `F.linear`'s matrix-vector product and int8 ones ~10% faster than `_weight_int8pack_mm`."""
    return (weight.float() * x.reshape(-1).float()).sum(-1)


class MatVecLinear(torch.nn.Linear):
    """A Linear for batch-1 decoding on the CPU: one-row inputs go through `compiled_matvec` inside a compiled
    step, and through `torch.mv` in eager bf16 (`F.linear` ran bf16 matrix-vector products at ~2/3 of the speed:
    108 us against 75 us for 768 -> 2304; 2.8 ms against 1.9 ms for the output head). Other inputs: `F.linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not one_row_on_cpu(x):
            return super().forward(x)
        if torch.compiler.is_compiling():
            out = compiled_matvec(self.weight, x).to(x.dtype)
        else:
            out = torch.mv(self.weight, x.reshape(-1))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], -1)


def use_matvec_for_decode(model: GPT2) -> GPT2:
    """Switch every Linear to `MatVecLinear` (same parameters, so tying is kept): faster batch-1 decoding on the
    CPU, compiled or in bf16."""
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = MatVecLinear
    return model


def quantize_int8(model: GPT2, rules: DeviceRules | None = None) -> GPT2:
    """Weight-only int8 (per output channel) for every projection and the output head, in place (gpt-fast style).

    The embedding keeps its float weights for the input lookup; the output head gets its own int8 copy.
    """
    rules = rules or device_rules(next(model.parameters()).device)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, Int8Linear.from_linear(child, rules))
    return model


@functools.cache
def inductor_streams_rows() -> bool:
    """Whether Inductor's one-row reductions (`compiled_matvec`) beat the library kernels on this CPU: with AVX-512
    (a 2-core EPYC, issues #18 and #30) float32 ones ran 2.4x faster than `F.linear` and int8 ones read the weights
    at 20-30 GB/s. With AVX2 only they lose: the float32 loop ran at 0.23-0.9x of `F.linear` per product and a
    whole 124M decode step at 0.64x (one thread); int8 is converted 8 values at a time through a slow partial
    vector load, 10.6 ms against 0.28 ms for `_weight_int8pack_mm` for 768 -> 2304 (`benchmarks/decode_kernels.py`).
    There a compiled step keeps `F.linear` and `_weight_int8pack_mm`."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def int8_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    scales_bf16: torch.Tensor,
    kernel: str,
    device_type: str,
    stream_rows: bool = True,
) -> torch.Tensor:
    """`x` `(M, K)` times the int8 `weight` `(N, K)` scaled per row, as the kernel of `device_type` computes it.

    The CPU: `_weight_int8pack_mm` with bf16 activations and scales (fast with bf16 only: 44 us against 478 us in
    float32 for a 768 -> 2304 projection), or inside a compiled step one row as a streaming reduction where
    Inductor makes that fast (`stream_rows`: `inductor_streams_rows`, asked outside the trace). Elsewhere
    `int8pack`: the device's `_weight_int8pack_mm` (CUDA's computes in float32 whatever it is given; MPS's wants
    the scales in the activations' dtype); `dequant`/`fused`: the matmul of a float copy of the weights, which
    Inductor fuses into the product only on CUDA's `fused` path, compiled, one row."""
    if device_type == "cpu":
        if x.size(0) == 1 and torch.compiler.is_compiling() and stream_rows:  # the bf16 scales, as below
            return (compiled_matvec(weight, x) * scales_bf16.float()).to(x.dtype).unsqueeze(0)
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), weight, scales_bf16).to(x.dtype)
    if kernel == "int8pack":
        return torch._weight_int8pack_mm(x.contiguous(), weight, scales.to(x.dtype))
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


class Int8Linear(torch.nn.Module):
    """y = x · dequant(W)ᵀ + b with W stored as int8 rows and one float scale per row.

    `kernel`: the device rules' int8 kernel when it was made (`int8pack`, `dequant`, `fused`). Rows may be padded
    with zeros for the kernel (MPS's wants multiples of 32): their outputs are cut off."""

    def __init__(
        self,
        weight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        kernel: str = "int8pack",
        out_features: int | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("scales_bf16", scales.to(torch.bfloat16))
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.kernel = kernel
        self.out_features = weight.size(0) if out_features is None else out_features
        # Decided here, not while a step is traced (asking the CPU there breaks the graph): a constant to Dynamo.
        self.stream_rows = weight.device.type != "cpu" or inductor_streams_rows()

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, rules: DeviceRules | None = None) -> Int8Linear:
        rules = rules or device_rules(linear.weight.device)
        weight = linear.weight.detach().float()
        rows, width = weight.shape
        kernel = rules.int8_kernel if width % rules.int8_width_multiple == 0 else "dequant"
        padded = -(-rows // rules.int8_row_multiple) * rules.int8_row_multiple if kernel == "int8pack" else rows
        if padded != rows:  # zero rows: their outputs are computed, then cut off
            weight = torch.cat([weight, weight.new_zeros(padded - rows, width)])
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        quantized = torch.round(weight / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(quantized, scales.to(linear.weight.dtype), bias, kernel, rows)

    def tensors_read(self) -> list[torch.Tensor]:
        """What `forward` reads of its own: the CPU's kernel takes the bf16 scales, other devices the float ones
        (never both)."""
        scales = self.scales_bf16 if self.weight.device.type == "cpu" else self.scales
        return [self.weight, scales, *([] if self.bias is None else [self.bias])]

    def dequantized_bytes(self, rows: int, compiled: bool) -> int:
        """Bytes of the float copy of the weights a decode step of `rows` rows writes and its matmul reads again:
        none for `int8pack` (nor for the CPU's compiled reduction), nor for `fused` compiled at one row, where
        Inductor converts each weight as it reads it; otherwise one copy in the activations' dtype (the scales')."""
        if self.weight.device.type == "cpu" or self.kernel == "int8pack":
            return 0
        if self.kernel == "fused" and compiled and rows == 1:
            return 0
        return self.weight.numel() * self.scales.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        out = int8_matmul(
            flat, self.weight, self.scales, self.scales_bf16, self.kernel, flat.device.type, self.stream_rows
        )
        if self.out_features != out.size(-1):
            out = out.narrow(-1, 0, self.out_features)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)


# ---------------------------------------------------------------- int4
#
# Weight-only int4: group-wise round-to-nearest with a scale and a zero point per group (gpt-fast's scheme).
#
# Each row of a Linear's weight is cut into groups of `group_size` input features; a group's 16 levels span its
# minimum to its maximum, so w ≈ (q - 8) · scale + zero with q in 0..15 and zero = min + 8 · scale. The matmul is
# torch's "tinygemm": `_weight_int4pack_mm_for_cpu` (activations in bf16) on the CPU, `_weight_int4pack_mm` on CUDA
# GPUs of compute capability 8.0 or later and on MPS (the same packed layout and table). The kernels want the output
# rows in multiples of 16 (CPU) or 8 (CUDA, MPS), so the 50,257-row head is padded with zero rows and its extra
# outputs are cut off.

ROW_MULTIPLE = 64  # output rows are padded to this: a multiple of what the kernels need (16 on the CPU, 8 elsewhere)


def int4_kernel_missing(device: torch.device) -> str | None:
    """Why this device cannot run the int4 kernels (`DeviceRules.int4_problem`), or None where it can."""
    return device_rules(device).int4_problem


def check_int4_runs(device: torch.device) -> None:
    """Refuse `--quantize int4` before the checkpoint is read where no kernel exists (exit 2)."""
    reason = int4_kernel_missing(device)
    if reason is not None:
        raise UsageError(f"--quantize int4 cannot run on {device}: {reason}; use --quantize int8 or none")


def check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise UsageError(f"--group-size {group_size}: use one of {', '.join(map(str, GROUP_SIZES))}")


def group_quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes `(N, K)` int32 in 0..15 and the kernels' `(K / group_size, N, 2)` bf16 table of (scale, zero).

    The codes are rounded against the bf16 scale and zero the kernel will use, not the float32 ones, so that
    rounding the table does not add to the error."""
    rows, columns = weight.shape
    groups = weight.float().reshape(rows, columns // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low).clamp(min=1e-6) / 15).to(torch.bfloat16)
    zeros = (low + 8 * scales.float()).to(torch.bfloat16)
    start = zeros.float() - 8 * scales.float()  # the value code 0 stands for
    codes = torch.round((groups - start.unsqueeze(-1)) / scales.float().unsqueeze(-1)).clamp(0, 15)
    table = torch.stack([scales.t(), zeros.t()], dim=-1)  # (K / G, N, 2), row-major
    return codes.to(torch.int32).reshape(rows, columns), table


def dequantize(codes: torch.Tensor, table: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight `(N, K)` the kernel multiplies by: (q - 8) · scale + zero (for tests and references)."""
    rows, columns = codes.shape
    scales, zeros = table[..., 0].t().float(), table[..., 1].t().float()  # (N, K / G)
    groups = codes.float().reshape(rows, columns // group_size, group_size)
    return ((groups - 8) * scales[..., None] + zeros[..., None]).reshape(rows, columns)


def pack_int4(codes: torch.Tensor, device_type: str) -> torch.Tensor:
    """The codes `(N, K)` packed for the int4 kernel of `device_type`."""
    if device_type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # inner tiles: unused on the CPU
    # tinygemm (CUDA, MPS) takes two codes per byte, the even column in the high nibble; 8 inner K tiles where K allows.
    rows, columns = codes.shape
    inner_tiles = next(tiles for tiles in (8, 4, 2) if columns % (tiles * 16) == 0)
    even, odd = codes.view(rows, columns // 2, 2).unbind(-1)
    pairs = (even << 4 | odd).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(pairs, inner_tiles)


def int4_matmul(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, table: torch.Tensor, device_type: str
) -> torch.Tensor:
    """bf16 activations `(M, K)` times the packed int4 weight: `(M, N)` for the (padded) N rows."""
    if device_type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, table)
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, table)


def tinygemm_packs(in_features: int) -> bool:
    """tinygemm's packing needs the input width to be a multiple of 32 (two inner K tiles of 16)."""
    return in_features % 32 == 0


class Int4Linear(torch.nn.Module):
    """y = x · dequant(W)ᵀ + b with W packed as int4 for torch's tinygemm kernels."""

    def __init__(
        self,
        packed: torch.Tensor,
        table: torch.Tensor,
        bias: torch.Tensor | None,
        in_features: int,
        out_features: int,
        group_size: int,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", table)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, group_size: int) -> Int4Linear:
        weight = linear.weight.detach()
        rows = weight.size(0)
        padded = -(-rows // ROW_MULTIPLE) * ROW_MULTIPLE
        if padded != rows:  # zero rows: their outputs are computed, then cut off
            weight = torch.cat([weight, weight.new_zeros(padded - rows, weight.size(1))])
        codes, table = group_quantize(weight, group_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(
            pack_int4(codes, weight.device.type), table.to(weight.device), bias, weight.size(1), rows, group_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # Every kernel takes bf16 activations (the CPU's: fp32 ~100x slower; CUDA's: bf16 only), row-major.
        flat = x.reshape(-1, shape[-1]).to(torch.bfloat16).contiguous()
        out = int4_matmul(flat, self.weight, self.group_size, self.scales_and_zeros, flat.device.type)
        out = out.narrow(1, 0, self.out_features).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
