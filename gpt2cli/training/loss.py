"""Cross-entropy over GPT-2's 50,257-way output without materialising the full logits.

A plain `F.cross_entropy(lm_head(x).float(), y)` writes batch × time × 50257 float32 logits, then reads and writes
them again for the log-softmax, its backward and the dtype casts: on a CPU that is about half of a small model's
training step. Here the output projection and the loss run together, a block of rows at a time, and the gradients
of the hidden states and of the projection weight are computed during the forward pass (softmax minus one-hot is
known as soon as the loss is), so each block's logits are used while they are still in cache.

The gradient with respect to the logits is `(softmax - one_hot(target)) · w` for a row of weight `w`. The kernels
return only `softmax · w`; the one-hot part touches one logit per row, so it is applied to the two products instead
(`- w · W[target]` for the hidden state, `- w · h` added to the target's row of the weight gradient), which keeps a
per-element comparison against the target out of the kernel's inner loop (measured 16 → 10 ms per 512 rows).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from gpt2cli.model.gpt2 import GPT2, IGNORE_INDEX
from gpt2cli.runtime.compile import compiler_failure, is_compiler_error, loss_compile_arguments

BLOCK_ELEMENTS = 1 << 25  # most logits per block: 32 Mi (64 MiB in bf16), 667 rows of a 50,257-word vocabulary

BlockKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cross_entropy_block(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss summed over a block of rows, `sum(w · (logsumexp - logit[target]))`, and `softmax · w`.

    `weights` is 1 for rows that count and 0 for ignored ones, whose `targets` must still be valid column indices.
    The softmax comes back in the logits' dtype; statistics are computed in float32, in one float32 buffer worked
    on in place. (The mean's 1/count is applied later, in float32: in fp16, softmax / count underflows.)
    """
    shifted = logits.to(torch.float32, copy=True)
    shifted -= shifted.amax(dim=-1, keepdim=True)
    picked = shifted.gather(1, targets[:, None]).squeeze(1)
    exp = shifted.exp_()  # computed once, used for both the loss and the softmax
    total = exp.sum(dim=-1, keepdim=True)
    loss = ((torch.log(total).squeeze(1) - picked) * weights).sum()
    return loss, exp.mul_(weights[:, None] / total).to(logits.dtype)


def cross_entropy_block_for_compile(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cross_entropy_block` written out of place for torch.compile, which fuses it into one pass per row."""
    x = logits.float()
    row_max = x.amax(dim=-1, keepdim=True)
    exp = torch.exp(x - row_max)
    total = exp.sum(dim=-1, keepdim=True)
    picked = x.gather(1, targets[:, None]) - row_max
    loss = ((torch.log(total) - picked).squeeze(1) * weights).sum()
    return loss, (exp * (weights[:, None] / total)).to(logits.dtype)


_compiled_kernel: BlockKernel | None = None


def block_kernel(compiled: bool) -> BlockKernel:
    """The eager kernel, or one compiled by torch.compile into a single fused pass per block."""
    global _compiled_kernel
    if not compiled:
        return cross_entropy_block
    if _compiled_kernel is None:
        _compiled_kernel = torch.compile(cross_entropy_block_for_compile, **loss_compile_arguments())
    return _compiled_kernel


TRANSPOSE_TILE = 1024  # rows of the long side per tile when transposing: a tile's source and destination fit in L2


def _transposed(matrix: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`matrix.t().contiguous().to(dtype)` tile by tile: on the CPU 2.7x faster for a (50257, 256) matrix (each
    tile's strided reads and writes stay in cache), and the cast costs no extra pass."""
    rows, columns = matrix.shape
    if matrix.device.type != "cpu":  # GPUs transpose at memory speed anyway
        return matrix.t().contiguous().to(dtype or matrix.dtype)
    out = torch.empty(columns, rows, dtype=dtype or matrix.dtype, device=matrix.device)
    if rows >= columns:
        for start in range(0, rows, TRANSPOSE_TILE):
            out[:, start : start + TRANSPOSE_TILE].copy_(matrix[start : start + TRANSPOSE_TILE].t())
    else:
        for start in range(0, columns, TRANSPOSE_TILE):
            out[start : start + TRANSPOSE_TILE].copy_(matrix[:, start : start + TRANSPOSE_TILE].t())
    return out


def _block_rows(rows: int, vocab: int) -> int:
    """Rows per block: at most BLOCK_ELEMENTS logits, in equal blocks (a short last block would run slowly and
    make torch.compile specialise once more)."""
    blocks = -(-rows * vocab // BLOCK_ELEMENTS)
    return max(1, -(-rows // max(1, blocks)))


class TiedGradient:
    """One training forward's link between the fused loss and the token embedding that shares its weight.

    The loss's backward always runs before the embedding's (the embedding's output gradient flows back through the
    whole model from the loss). So the loss hands its (V, C) weight gradient over here instead of to autograd, and
    the embedding's backward adds its rows into it in place and returns it as the pair's one contribution: no
    second (V, C) tensor filled with zeros that autograd would then add to the first, two passes over the
    vocabulary's gradient fewer each step. Other gradients of the weight (a second forward, a penalty term) are
    still summed by autograd as usual.
    """

    def __init__(self) -> None:
        self.grad_weight: torch.Tensor | None = None


class _TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, idx: torch.Tensor, weight: torch.Tensor, tied: TiedGradient
    ) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.tied, ctx.weight_spec = tied, (weight.shape, weight.dtype, weight.device)  # type: ignore[attr-defined]
        return F.embedding(idx, weight)

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):  # type: ignore[override]
        (idx,) = ctx.saved_tensors  # type: ignore[attr-defined]
        tied: TiedGradient = ctx.tied  # type: ignore[attr-defined]
        rows = grad.reshape(-1, grad.size(-1))
        grad_weight, tied.grad_weight = tied.grad_weight, None
        if grad_weight is None:  # the loss's backward did not run: an ordinary dense gradient
            shape, dtype, device = ctx.weight_spec  # type: ignore[attr-defined]
            grad_weight = torch.zeros(shape, dtype=dtype, device=device)
        return None, grad_weight.index_add_(0, idx.reshape(-1), rows.to(grad_weight.dtype)), None


def tied_embedding(idx: torch.Tensor, weight: torch.Tensor, tied: TiedGradient) -> torch.Tensor:
    """`F.embedding(idx, weight)` whose weight gradient is added into the fused loss's one (see `TiedGradient`)."""
    return _TiedEmbedding.apply(idx, weight, tied)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        compute_dtype: torch.dtype,
        kernel: BlockKernel,
        tied: TiedGradient | None,
        normalizer: float | None,
    ) -> torch.Tensor:
        rows, vocab = hidden.size(0), weight.size(0)
        block = _block_rows(rows, vocab)
        needs_grad = any(ctx.needs_input_grad[:2])  # type: ignore[attr-defined]
        # A frozen output projection (LoRA) needs no (V, C) weight gradient: neither its sum nor its memory.
        weight_grad = ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        with torch.autocast(hidden.device.type, enabled=False):
            hidden_c = hidden.to(compute_dtype)
            weight_t = _transposed(weight, compute_dtype)  # (C, V): the layout the logits product streams fastest
            valid = (targets != IGNORE_INDEX).to(torch.float32)  # the rows' weights w: 1, or 0 if ignored
            # The mean, applied in float32 (see the kernels): over these rows, or over a whole step's (`normalizer`;
            # filled on the device, not copied from the host, which could wait for the GPU).
            if normalizer is None:
                inverse_count = 1.0 / valid.sum().clamp(min=1.0)
            else:
                inverse_count = torch.full((), 1.0 / normalizer, dtype=torch.float32, device=hidden.device)
            safe_targets = targets.clamp(min=0)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            softmax_hidden = torch.empty_like(hidden_c) if needs_grad else None  # Σ_v softmax·w · W[v], (N, C)
            softmax_weight: torch.Tensor | None = None  # Σ_n softmax·w · h[n], (V, C)
            # fp16 has too little range to sum many blocks: there the sum is kept in float32 (bf16 has float32's).
            accumulate_in_float32 = compute_dtype == torch.float16
            logits = torch.empty(min(block, rows), vocab, dtype=compute_dtype, device=hidden.device)
            for start in range(0, rows, block):
                rows_here = slice(start, start + block)
                block_hidden = hidden_c[rows_here]
                block_logits = logits[: block_hidden.size(0)]
                torch.mm(block_hidden, weight_t, out=block_logits)
                block_loss, probs = kernel(block_logits, safe_targets[rows_here], valid[rows_here])
                loss += block_loss
                if needs_grad:
                    torch.mm(probs, weight_t.t(), out=softmax_hidden[rows_here])  # type: ignore[index]
                if weight_grad and softmax_weight is None:
                    softmax_weight = probs.t() @ block_hidden
                    softmax_weight = softmax_weight.float() if accumulate_in_float32 else softmax_weight
                elif weight_grad and accumulate_in_float32:
                    softmax_weight += probs.t() @ block_hidden
                elif weight_grad:  # accumulated while the block's softmax is in cache
                    softmax_weight.addmm_(probs.t(), block_hidden)  # type: ignore[union-attr]
        if needs_grad:
            # Minus the one-hot: w · W[target] for each row's hidden state (float32 from here on).
            grad_hidden = softmax_hidden.float().sub_(weight[safe_targets].float() * valid[:, None])  # type: ignore[union-attr]
            # Added to the targets' rows of the weight gradient (none for a frozen weight).
            target_rows = hidden_c.float() * -valid[:, None] if weight_grad else None
            ctx.save_for_backward(grad_hidden, softmax_weight, target_rows, safe_targets, inverse_count)
        ctx.input_dtypes = (hidden.dtype, weight.dtype)  # type: ignore[attr-defined]
        ctx.tied = tied  # type: ignore[attr-defined]
        return loss * inverse_count

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor):  # type: ignore[override]
        grad_hidden, softmax_weight, target_rows, safe_targets, inverse_count = ctx.saved_tensors  # type: ignore[attr-defined]
        hidden_dtype, weight_dtype = ctx.input_dtypes  # type: ignore[attr-defined]
        scale = (grad_output.to(torch.float32) * inverse_count).reshape(1)  # 1-D: a bf16 tensor times it is float32
        # Out of place: the saved tensors stay valid for another backward pass (retain_graph=True).
        grad_hidden = (grad_hidden * scale).to(hidden_dtype)
        if softmax_weight is None:  # a frozen weight
            return grad_hidden, None, None, None, None, None, None
        grad_weight = torch.mul(softmax_weight, scale)  # float32 (V, C), scaled and cast in one pass
        grad_weight.index_add_(0, safe_targets, target_rows * scale)
        grad_weight = grad_weight.to(weight_dtype)
        tied: TiedGradient | None = ctx.tied  # type: ignore[attr-defined]
        if tied is not None:  # the embedding's backward adds its rows and hands the sum to autograd
            tied.grad_weight = grad_weight
            return grad_hidden, None, None, None, None, None, None
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    compute_dtype: torch.dtype | None = None,
    compiled: bool = False,
    tied: TiedGradient | None = None,
    normalizer: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (-1 ignored), without storing the logits.

    `hidden` is (N, C), `weight` (V, C), `targets` (N,). `compute_dtype` defaults to the autocast dtype when
    autocast is on, else the hidden states' dtype. `tied` links the gradient to a `tied_embedding` of `weight`.
    `normalizer`: divide the summed loss by this instead of the count of targets here (a step's mean over all of its
    micro-batches and processes; 1 gives the sum).
    """
    if compute_dtype is None:
        device_type = hidden.device.type
        autocast_on = torch.is_autocast_enabled(device_type)
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast_on else hidden.dtype
    kernel = block_kernel(compiled)
    try:
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, compute_dtype, kernel, tied, normalizer)
    except Exception as error:
        # Only a compiler that cannot build the kernel (no C++ compiler on the CPU, no Triton) falls back; anything
        # else, out-of-memory first of all, is the caller's to see (`gpt2 bench` reports it as OOM).
        if kernel is cross_entropy_block or not is_compiler_error(error):
            raise
        warnings.warn(
            f"compiled loss kernel unavailable ({compiler_failure(error)}); using the eager one", stacklevel=2
        )
        global _compiled_kernel, compiled_kernel_failure
        _compiled_kernel, compiled_kernel_failure = cross_entropy_block, compiler_failure(error)
        return _FusedLinearCrossEntropy.apply(
            hidden, weight, targets, compute_dtype, cross_entropy_block, tied, normalizer
        )


# Why the compiled loss kernel fell back to the eager one in this process (None: it did not). Results that say
# "compiled" check it: a run whose loss ran eagerly does not report a compiled loss.
compiled_kernel_failure: str | None = None


# ---------------------------------------------------------------- the module the training step calls


class TrainingModel(nn.Module):
    """GPT-2's hidden states and the fused output-projection loss in one `forward`.

    `GPT2.forward` stays plain (logits, then the loss). Training never needs the (B, T, 50257) logits, so this module
    computes the loss block by block without storing them (`losses.fused_linear_cross_entropy`), and hands the tied
    embedding's gradient to the loss's (`losses.TiedGradient`). DDP and FSDP2 wrap this module, not the GPT2 inside it:
    their forward hooks (gradient sync, unsharding the root's weights) run only when training goes through this
    module's `forward`. The GPT2 inside keeps its own parameter names: checkpoints are saved from it, without prefix.
    """

    def __init__(self, model: GPT2, compiled_loss: bool = False) -> None:
        super().__init__()
        self.model = model
        self.compiled_loss = compiled_loss  # the loss kernel compiled by torch.compile (with --compile)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor,
        documents: torch.Tensor | None = None,
        normalizer: float | None = None,
    ) -> torch.Tensor:
        """The mean cross-entropy of the next tokens `targets` `(B, T)` (-1 ignored) after `idx` `(B, T)`.

        `documents` `(B, T)`: the packed examples of each row, kept apart (`GPT2.hidden_states`). `normalizer`: the
        summed loss is divided by it instead of by the count of targets here (see `fused_linear_cross_entropy`)."""
        model = self.model
        wte = model.transformer.wte
        tied_and_trained = model.lm_head.weight is wte.weight and wte.weight.requires_grad
        tied = TiedGradient() if tied_and_trained else None
        tok_emb = wte(idx) if tied is None else tied_embedding(idx, wte.weight, tied)  # (B, T, C)
        x = model.hidden_states(idx, tok_emb=tok_emb, documents=documents)  # (B, T, C)
        flat = x.view(-1, x.size(-1))  # (B*T, C)
        # Evaluation (no gradient) keeps the eager kernel: no second compilation for a few calls.
        compiled = self.compiled_loss and torch.is_grad_enabled()
        return fused_linear_cross_entropy(
            flat, model.lm_head.weight, targets.reshape(-1), compiled=compiled, tied=tied, normalizer=normalizer
        )
