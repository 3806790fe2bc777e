"""Throughput, MFU and memory of the training step, the forward pass, prefill and decode (llama-bench style).

Tests: `train` (forward, backward, clip, AdamW), `fwd` (forward only), `ppN` (prefill N prompt tokens into the KV
cache), `tgN` (decode N tokens one step at a time). Each case runs `warmup` times untimed (compilation included and
reported separately), then `reps` timed runs: mean ± standard deviation of tokens/s.

FLOPs per token (nanoGPT's estimate): training 6·N + 12·L·C·T, with N the parameters without the position
embeddings, L layers, C the width and T the sequence length; a forward pass is a third of that, 2·N + 4·L·C·T;
prefill projects only the last position onto the vocabulary (`model/flops.py`). MFU = achieved FLOP/s ÷ the device's
dense peak for the dtype (from a table of known GPUs, or --peak-tflops).

Decode reads every weight once per step, so its ceiling is memory bandwidth: achieved bandwidth = the bytes a step
reads (weights as stored, int8/int4 included; see `quantize.decode_bytes_per_token`) × steps/s, reported against
the read bandwidth measured on this machine (`runtime/bandwidth.py`) and, for known GPUs, the table's peak."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gpt2cli.errors import UsageError
from gpt2cli.model.flops import forward_flops_per_token, mfu, prefill_flops_per_token, training_flops_per_token
from gpt2cli.model.gpt2 import GPT2, KVCache
from gpt2cli.runtime.compile import compile_blocks, default_compile_arguments
from gpt2cli.runtime.devices import (
    Precision,
    device_rules,
    fast_matmul,
    peak_bandwidth_gbps,
    peak_memory_bytes,
    peak_tflops,
    release_cached_memory,
    reset_peak_memory,
    synchronize,
)
from gpt2cli.training import loss as losses
from gpt2cli.training.loss import TrainingModel
from gpt2cli.training.optim import build_optimizer

_TEST = re.compile(r"^(train|fwd|pp(\d+)|tg(\d+))$")


@dataclass(frozen=True)
class Case:
    test: str  # as named: train, fwd, pp512, tg128
    batch_size: int
    seq_len: int  # tokens per sequence: T for train/fwd, the prompt for pp, the generated tokens for tg

    @property
    def kind(self) -> str:
        return self.test[:2] if self.test[:2] in ("pp", "tg") else self.test

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


@dataclass
class CaseResult:
    case: Case
    dtype: str
    compile: bool
    tokens_per_s: float | None = None
    tokens_per_s_std: float | None = None
    mfu: float | None = None
    peak_memory_bytes: int | None = None
    warmup_s: float | None = None
    ms_per_token: float | None = None  # decode: time per step
    bandwidth_gbps: float | None = None  # decode: weight bytes read per second
    bandwidth_fraction: float | None = None  # of the GPU table's peak
    quantize: str = "none"
    group_size: int | None = None  # int4 only
    weight_bytes_per_token: int | None = None  # decode: what one step reads
    measured_read_gbps: float | None = None  # decode: this machine's read bandwidth, measured in this run
    measured_read_fraction: float | None = None  # decode: achieved ÷ measured
    error: str | None = None  # "OOM" when the case did not fit
    runs_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "test": self.case.test,
            "batch_size": self.case.batch_size,
            "seq_len": self.case.seq_len,
            "dtype": self.dtype,
            "compile": self.compile,
            "tokens_per_s": self.tokens_per_s,
            "tokens_per_s_std": self.tokens_per_s_std,
            "mfu": self.mfu,
            "peak_memory_bytes": self.peak_memory_bytes,
            "warmup_s": self.warmup_s,
            "ms_per_token": self.ms_per_token,
            "bandwidth_gbps": self.bandwidth_gbps,
            "bandwidth_fraction": self.bandwidth_fraction,
            "quantize": self.quantize,
            "group_size": self.group_size,
            "weight_bytes_per_token": self.weight_bytes_per_token,
            "measured_read_gbps": self.measured_read_gbps,
            "measured_read_fraction": self.measured_read_fraction,
            "error": self.error,
        }


def parse_tests(spec: list[str]) -> list[str]:
    tests = []
    for name in spec:
        match = _TEST.match(name.strip())
        if not match or (match.group(1)[:2] in ("pp", "tg") and int(match.group(2) or match.group(3)) < 1):
            raise UsageError(f"unknown test {name.strip()!r}: use train, fwd, ppN or tgN (e.g. pp512, tg128)")
        tests.append(match.group(1))
    return tests


def plan_cases(tests: list[str], batch_sizes: list[int], seq_lens: list[int], block_size: int) -> list[Case]:
    """The cross product, like llama-bench; pp/tg take their length from their name, so they ignore --seq-len."""
    cases: list[Case] = []
    for test in tests:
        for batch in batch_sizes:
            if test in ("train", "fwd"):
                cases.extend(Case(test, batch, seq_len) for seq_len in seq_lens)
            else:
                cases.append(Case(test, batch, int(test[2:])))
    for case in cases:
        if case.seq_len > block_size:
            raise UsageError(f"{case.test} needs {case.seq_len} positions; the model's block size is {block_size}")
    return cases


def case_flops_per_token(model: GPT2, case: Case) -> float:
    """FLOPs per token of a train, fwd or pp case (see `model/flops.py`): prefill projects only its last position."""
    config, parameters = model.config, model.num_parameters(exclude_positions=True)
    if case.kind == "train":
        return training_flops_per_token(parameters, config.n_layer, config.n_embd, case.seq_len)
    if case.kind == "pp":
        return prefill_flops_per_token(parameters, config.n_layer, config.n_embd, config.vocab_size, case.seq_len)
    return forward_flops_per_token(parameters, config.n_layer, config.n_embd, case.seq_len)


def _is_out_of_memory(error: BaseException) -> bool:
    return (
        isinstance(error, torch.OutOfMemoryError)
        or "out of memory" in str(error).lower()
        or ("can't allocate memory" in str(error))
    )


class Runner:
    """Builds the work of each case (a closure that processes `case.tokens` tokens once) and times it."""

    def __init__(
        self,
        model: GPT2,
        precision: Precision,
        compile: bool,
        peak: float | None = None,
        quantize: str = "none",
        group_size: int = 32,
    ) -> None:
        self.model = model
        self.precision = precision
        self.device = precision.device
        self.rules = device_rules(self.device)
        self.compile = compile
        self.peak = peak if peak is not None else peak_tflops(self.device, precision.dtype)
        self.bandwidth = peak_bandwidth_gbps(self.device)
        self.quantize, self.group_size = quantize, group_size
        self._measured_read_gbps: float | None = None
        self._compiled: dict[str, Callable[..., Any]] = {}
        self._decode_step: tuple[Callable[..., torch.Tensor], bool] | None = None  # (step, attends to whole cache)
        self._inference_model: GPT2 | None = None

    def weight_bytes(self, case: Case) -> int:
        """Bytes one decode step of `case` reads: the inference weights as stored (float, int8 or int4), and a float
        copy of int8 weights where its kernel writes one (`quantize.decode_bytes_per_token`)."""
        from gpt2cli.generation.quantize import decode_bytes_per_token

        return decode_bytes_per_token(self.inference_model(), rows=case.batch_size, compiled=self.compile)

    def measured_read_gbps(self) -> float:
        """This machine's read bandwidth in GB/s, measured once per run (the first decode case pays for it)."""
        if self._measured_read_gbps is None:
            from gpt2cli.runtime.bandwidth import read_bandwidth

            self._measured_read_gbps = read_bandwidth(self.device) / 1e9
        return self._measured_read_gbps

    def inference_model(self) -> GPT2:
        """The model for fwd/pp/tg: weights stored in the benchmark's dtype, as `gpt2 sample --dtype` runs it, and
        quantized as `--quantize` says.

        Autocast would cast every float32 weight again at each decode step, which is not how inference runs. The
        copy is cast one tensor at a time (never a second float32 model on the device).
        """
        if self._inference_model is None:
            dtype = self.precision.dtype
            if dtype is None and self.quantize == "none":
                self._inference_model = self.model
            else:
                from gpt2cli.generation.loading import quantize_for_inference
                from gpt2cli.generation.quantize import use_matvec_for_decode

                with torch.device("meta"):
                    copy = GPT2(self.model.config)
                # named_parameters yields the tied embedding once; tie_weights shares it with the head again.
                cast = {
                    name: tensor.detach().to(self.device, dtype or tensor.dtype, copy=True)
                    for name, tensor in self.model.named_parameters()
                }
                copy.load_state_dict(cast, strict=False, assign=True)
                copy.tie_weights()
                self._inference_model = copy.eval().requires_grad_(False)
                quantize_for_inference(  # the decode cases run this copy
                    self._inference_model, self.quantize, self.group_size, compile=self.compile, decode=True
                )
                if self.rules.streaming_matvec and dtype == torch.bfloat16:
                    use_matvec_for_decode(self._inference_model)
        return self._inference_model

    def _make_resident(self, case: Case) -> None:
        """Only what the case runs on stays on the GPU, before its peak memory is counted: the float32 training
        model (with its compiled blocks) leaves while inference cases run on their own copy, and comes back."""
        if not self.rules.own_memory:
            return
        if case.kind == "train":
            self.model.to(self.device)
        elif self.inference_model() is not self.model:
            self.model.to("cpu")

    def _tokens(self, batch: int, length: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(batch * 100_003 + length)
        return torch.randint(0, self.model.config.vocab_size, (batch, length), generator=generator).to(self.device)

    def _callable(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        if not self.compile:
            return function
        if name not in self._compiled:
            self._compiled[name] = torch.compile(function, **default_compile_arguments())
        return self._compiled[name]

    def work(self, case: Case) -> Callable[[], None]:
        model, precision = self.model, self.precision
        if case.kind == "train":
            model.train()
            if self.compile and not getattr(model, "_bench_blocks_compiled", False):
                compile_blocks(model.transformer.h)
                model._bench_blocks_compiled = True  # type: ignore[attr-defined]
            optimizer = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95), self.device)
            inputs, targets = self._tokens(case.batch_size, case.seq_len), self._tokens(case.batch_size, case.seq_len)
            trained = TrainingModel(model, compiled_loss=self.compile)  # the training forward, as `gpt2 train` runs it

            def train_step() -> None:
                with precision.autocast():
                    loss = trained(inputs, targets)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            return train_step
        model = self.inference_model()
        dtype = next(model.parameters()).dtype
        if case.kind == "fwd":
            forward = self._callable("forward", model.forward)
            inputs = self._tokens(case.batch_size, case.seq_len)

            def forward_pass() -> None:
                with torch.inference_mode():
                    forward(inputs)

            return forward_pass
        if case.kind == "pp":
            prompt = self._tokens(case.batch_size, case.seq_len)
            cache = KVCache(model.config, case.batch_size, self.device, dtype, length=case.seq_len)  # one for all reps

            def prefill() -> None:
                with torch.inference_mode():
                    model.next_token_logits(prompt, cache, 0)

            return prefill
        return self._decode_work(model, case, dtype)

    def _decode_work(self, model: GPT2, case: Case, dtype: torch.dtype) -> Callable[[], None]:
        """Decode `case.seq_len` tokens as `gpt2 sample` does: the same decode step (compiled once), the block-size
        cache, positions as a device tensor. One cache serves every rep, so a CUDA graph recorded in the warm-up
        is replayed, not recorded again."""
        from gpt2cli.generation.generator import compile_decode_step

        if self._decode_step is None:
            self._decode_step = compile_decode_step(model, self.compile)
        step, full_length = self._decode_step
        cache = KVCache(model.config, case.batch_size, self.device, dtype)
        positions = torch.zeros(case.batch_size, dtype=torch.long, device=self.device)  # (B,)
        first = self._tokens(case.batch_size, 1)

        def decode() -> None:
            positions.zero_()
            token = first
            with torch.inference_mode():
                for position in range(case.seq_len):
                    length = cache.capacity if full_length else cache.attend_length(position + 1)
                    logits = step(token, cache, positions, length)
                    positions.add_(1)
                    token = logits.argmax(dim=-1, keepdim=True)

        return decode

    def run(
        self, case: Case, reps: int, warmup: int, on_rep: Callable[[Case, str, int, int], None] | None = None
    ) -> CaseResult:
        # Prefill runs eagerly (its shape changes with every prompt): its result does not claim compilation.
        result = CaseResult(case, dtype=self.precision.name, compile=self.compile and case.kind != "pp")
        if case.kind != "train":  # training runs the float32 model: --quantize is for inference
            result.quantize = self.quantize
            result.group_size = self.group_size if self.quantize == "int4" else None
        try:
            self._make_resident(case)
            reset_peak_memory(self.device)
            with fast_matmul(self.device):
                work = self.work(case)
                started = time.perf_counter()
                for index in range(warmup):
                    if on_rep is not None:
                        on_rep(case, "warm-up", index + 1, warmup)
                    work()
                synchronize(self.device)
                result.warmup_s = time.perf_counter() - started
                for index in range(reps):
                    if on_rep is not None:
                        on_rep(case, "rep", index + 1, reps)
                    synchronize(self.device)
                    rep_started = time.perf_counter()
                    work()
                    synchronize(self.device)
                    result.runs_s.append(time.perf_counter() - rep_started)
        except (RuntimeError, MemoryError) as error:
            if not _is_out_of_memory(error):
                raise
            result.error = "OOM"
            release_cached_memory(self.device)
            return result
        finally:
            self.model.zero_grad(set_to_none=True)
        if case.kind == "train" and self.compile and losses.compiled_kernel_failure is not None:
            result.compile = False  # the blocks were compiled, but the loss ran eagerly: not a compiled result
        rates = [case.tokens / seconds for seconds in result.runs_s]
        result.tokens_per_s = statistics.fmean(rates)
        result.tokens_per_s_std = statistics.stdev(rates) if len(rates) > 1 else 0.0
        result.peak_memory_bytes = peak_memory_bytes(self.device)
        self._derive(result)
        return result

    def _derive(self, result: CaseResult) -> None:
        case, rate = result.case, result.tokens_per_s or 0.0
        if case.kind == "tg":
            steps_per_s = rate / case.batch_size
            result.ms_per_token = 1000.0 / steps_per_s
            result.weight_bytes_per_token = self.weight_bytes(case)
            result.bandwidth_gbps = result.weight_bytes_per_token * steps_per_s / 1e9  # each step reads every weight
            if self.bandwidth is not None:
                result.bandwidth_fraction = result.bandwidth_gbps / self.bandwidth
            result.measured_read_gbps = self.measured_read_gbps()
            result.measured_read_fraction = result.bandwidth_gbps / result.measured_read_gbps
            return
        result.mfu = mfu(case_flops_per_token(self.model, case), rate, self.peak)


def environment(device: torch.device) -> dict[str, Any]:
    import os
    import platform

    from gpt2cli import __version__
    from gpt2cli.runtime.devices import device_name

    return {
        "gpt2cli": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu": device_name(torch.device("cpu")),
        "cores": os.cpu_count(),
    }
