"""Weight-only int4: group-wise round-to-nearest with a scale and a zero point per group (gpt-fast's scheme).

Each row of a Linear's weight is cut into groups of `group_size` input features; a group's 16 levels span its
minimum to its maximum, so w ≈ (q - 8) · scale + zero with q in 0..15 and zero = min + 8 · scale. The matmul is
torch's "tinygemm": `_weight_int4pack_mm_for_cpu` (activations in bf16) on the CPU, `_weight_int4pack_mm` on CUDA
GPUs of compute capability 8.0 or later. The kernels want the output rows in multiples of 16 (CPU) or 8 (CUDA), so
the 50,257-row head is padded with zero rows and its extra outputs are cut off.
"""

from __future__ import annotations

import torch

from gpt2cli.errors import UsageError
from gpt2cli.settings.types import GROUP_SIZES

ROW_MULTIPLE = 64  # output rows are padded to this: a multiple of what both kernels need (16 on the CPU, 8 on CUDA)


def int4_kernel_missing(device: torch.device) -> str | None:
    """Why this device cannot run the int4 kernels, or None where it can."""
    if device.type == "cpu":
        return None if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") else "this torch has no CPU int4 kernel"
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        if major < 8:  # tinygemm is built for Ampere and later only
            return f"the GPU (compute capability {major}.{minor}) is older than 8.0, which torch's int4 kernel needs"
        return None
    return f"torch has no int4 matmul kernel for {device.type}"


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
    codes = torch.round((groups - start[..., None]) / scales.float()[..., None]).clamp(0, 15)
    table = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # (K / G, N, 2)
    return codes.to(torch.int32).reshape(rows, columns), table


def dequantize(codes: torch.Tensor, table: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight `(N, K)` the kernel multiplies by: (q - 8) · scale + zero (for tests and references)."""
    rows, columns = codes.shape
    scales, zeros = table[..., 0].t().float(), table[..., 1].t().float()  # (N, K / G)
    groups = codes.float().reshape(rows, columns // group_size, group_size)
    return ((groups - 8) * scales[..., None] + zeros[..., None]).reshape(rows, columns)


def _pack(codes: torch.Tensor) -> torch.Tensor:
    if codes.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # inner tiles: unused on the CPU
    # CUDA packs two codes per byte itself, the even column in the high nibble; 8 inner K tiles where K allows.
    columns = codes.size(1)
    inner_tiles = next(tiles for tiles in (8, 4, 2) if columns % (tiles * 16) == 0)
    pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(pairs, inner_tiles)


def cuda_packs(in_features: int) -> bool:
    """CUDA's packing needs the input width to be a multiple of 32 (two inner K tiles of 16)."""
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
        return cls(_pack(codes), table.to(weight.device), bias, weight.size(1), rows, group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # both kernels take bf16 activations (fp32: ~100x slower)
        if flat.device.type == "cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group_size, self.scales_and_zeros)
        else:
            out = torch.ops.aten._weight_int4pack_mm(flat, self.weight, self.group_size, self.scales_and_zeros)
        out = out[:, : self.out_features].to(x.dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
