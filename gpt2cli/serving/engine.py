"""Continuous batching over the per-row KV cache: one scheduler thread, one decode step for every active sequence.

A sequence waits until a row of the cache is free; it is then prefilled alone into that row and joins the batch at
the next decode step. A sequence that finishes (or whose client went away) leaves at once: the last active row moves
into its place, so the active rows are always the first `n`, and a step reads only the first rows of the cache.
Each sequence keeps its own options and random generator, so what it samples does not depend on what shares the
batch.

A step attends to a power-of-two bucket of the cache (`KVCache.attend_length`). Compiled on CUDA, where each shape
is a CUDA graph, it also pads the `n` active rows up to a power of two: a few graphs over (rows, length) buckets,
all compiled and recorded when the engine starts (`StepBuckets`), so that one client neither reads the whole batch's
cache every step nor pays for a compilation.

With prompt lookup (`--prompt-lookup N`), each row drafts up to N tokens from its own text (`drafting.py`); a step
where any row has a draft is one verification pass over every active row (`GPT2.verify_logits`, eager), and each
row keeps its agreeing draft tokens plus the model's own. A row without a draft chooses its token as a plain step
does, so a seeded row's text depends on its own text alone, never on whether its neighbours drafted.

The sampler, the cache and the decode step are those of `gpt2 sample` (`generation/generator.py`): greedy output
is the same.
No FastAPI here; events go to whoever submitted the sequence through its `emit` callback (called from this thread).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpt2cli.data.tokenizer import Tokenizer
from gpt2cli.generation.drafting import Draft, LookupHistory, choose_with_drafts
from gpt2cli.generation.generator import DecodeStep, TextGenerator, compile_decode_step
from gpt2cli.generation.logit_filters import choose_next_per_row
from gpt2cli.generation.records import Completion, SamplingOptions
from gpt2cli.generation.sequences import TextTracker, accept_token
from gpt2cli.model.gpt2 import GPT2, MIN_ATTEND_LENGTH, KVCache
from gpt2cli.runtime.compile import allow_step_shapes, serve_compile_arguments
from gpt2cli.runtime.device_rules import rules_for
from gpt2cli.runtime.devices import device_rules, synchronize

TopLogprobs = list[tuple[int, float]]  # (token id, log-probability), likeliest first


@dataclass
class PromptScored:
    """The prompt's own log-probabilities (echo): None for the first token, which nothing predicts."""

    choice: int
    logprobs: list[float | None]
    top: list[TopLogprobs | None]


@dataclass
class TokenGenerated:
    """A generated token, the end-of-text token that finishes a sequence included."""

    choice: int
    token: int
    text: str  # text this token releases now ("" while it could still be part of a stop string)
    logprob: float | None = None  # under the model's own distribution (temperature 1, no filters)
    top: TopLogprobs | None = None


@dataclass
class Finished:
    choice: int
    finish_reason: str  # "stop", "length", or "cancelled"
    text: str = ""  # the text held back until now
    error: str | None = None


Event = PromptScored | TokenGenerated | Finished

_FINISH_REASONS = {"eot": "stop", "stop": "stop", "length": "length"}


@dataclass
class Sequence:
    """One completion to generate (a choice of a request)."""

    choice: int  # the index of this completion in its response
    prompt_ids: list[int]
    options: SamplingOptions
    rng: torch.Generator
    emit: Callable[[Event], None]
    logprobs: int | None = None  # alternatives per token to report (None: no log-probabilities)
    echo: bool = False  # score the prompt's tokens too
    cancelled: bool = False  # set by the client's side (disconnected); the scheduler drops the sequence
    completion: Completion = field(init=False)
    tracker: TextTracker | None = field(default=None, init=False)
    lookup: LookupHistory | None = field(default=None, init=False)  # its whole text, for prompt lookup
    steps: int = field(default=0, init=False)  # tokens chosen so far (the end-of-text token included)
    last_token: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.completion = Completion(prompt_ids=list(self.prompt_ids))


def _powers_of_two(low: int, high: int) -> tuple[int, ...]:
    """`low`, `2 low`, `4 low`... below `high`, then `high` (where it is not a power of two, the last bucket)."""
    values = []
    while low < high:
        values.append(low)
        low *= 2
    return (*values, high)


@dataclass(frozen=True)
class StepBuckets:
    """The shapes a decode step takes: `rows`, the batch sizes the active rows are padded to (None: exactly the
    active rows, whatever their number), and `lengths`, the attended lengths; both ascending."""

    rows: tuple[int, ...] | None
    lengths: tuple[int, ...]

    def pick(self, active: int, end: int) -> tuple[int, int]:
        """(rows, attended length) of a step over `active` rows whose furthest row ends at `end`."""
        rows = active if self.rows is None else next((r for r in self.rows if r >= active), self.rows[-1])
        return rows, next((length for length in self.lengths if length >= end), self.lengths[-1])

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, length) a step can take, fewest rows first; none where the rows are not bucketed (the
        eager or dynamically compiled step takes any shape as it comes)."""
        return [] if self.rows is None else [(rows, length) for rows in self.rows for length in self.lengths]


def step_buckets(device_type: str, compiled: bool, max_batch: int, capacity: int) -> StepBuckets:
    """The decode step's buckets for a cache of `max_batch` rows of `capacity` positions.

    Every device attends to the furthest row's end rounded up to a power of two (at least `MIN_ATTEND_LENGTH`, at
    most the capacity: `KVCache.attend_length`'s rule). A compiled step where the device rules say CUDA graphs (CUDA)
    replays a graph per shape, so there the rows are padded too, to a power of two (or `max_batch`): with the
    defaults (16 rows, 1024 positions) 5 × 7
    graphs, where one graph of the whole batch and cache made one client read ~0.6 GB of keys and values per step
    in bf16. Elsewhere a step runs exactly the active rows (eager, or the CPU's dynamic compilation)."""
    lengths = _powers_of_two(MIN_ATTEND_LENGTH, capacity)
    if compiled and rules_for(device_type).cuda_graphs:
        return StepBuckets(_powers_of_two(1, max_batch), lengths)
    return StepBuckets(None, lengths)


def compile_serve_step(model: GPT2, compile: bool) -> DecodeStep:
    """The engine's decode step: `gpt2 sample`'s, but compiled for bucketed shapes on CUDA
    (`runtime.compile.serve_compile_arguments`)."""
    rules = device_rules(next(model.parameters()).device)
    if compile and rules.cuda_graphs:
        return torch.compile(model.next_token_logits, **serve_compile_arguments(rules))
    step, _ = compile_decode_step(model, compile)
    return step


class Engine:
    """Owns the model on its own thread; `submit` sequences from any thread.

    `buckets`: the step's shapes (default: `step_buckets` for the device and `compile`). `prompt_lookup`: the most
    tokens a row drafts per step (None: no drafting)."""

    def __init__(
        self,
        model: GPT2,
        tokenizer: Tokenizer,
        max_batch: int,
        compile: bool = False,
        buckets: StepBuckets | None = None,
        prompt_lookup: int | None = None,
    ) -> None:
        if prompt_lookup is not None and prompt_lookup < 1:
            raise ValueError("prompt lookup needs a draft length of at least 1")
        self.prompt_lookup = prompt_lookup
        self.generator = TextGenerator(model, tokenizer)  # the cache and the eager prefill, as `gpt2 sample`
        self.model, self.tokenizer, self.max_batch = self.generator.model, tokenizer, max_batch
        self.device = self.generator.device
        self.step = compile_serve_step(self.model, compile)
        self.cache: KVCache = self.generator.cache_for(max_batch)
        self.buckets = buckets or step_buckets(self.device.type, compile, max_batch, self.cache.capacity)
        if compile and self.buckets.shapes:
            allow_step_shapes(len(self.buckets.shapes))
        self.warm_up_s: float | None = None  # set once the scheduler thread has warmed every bucket up
        self._warmed = threading.Event()
        self._warm_up_error: BaseException | None = None
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # (max_batch,) next position
        self.active: list[Sequence] = []  # row i of the cache holds active[i]
        self._waiting: deque[Sequence] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._cancel_all = False
        self._thread = threading.Thread(target=self._run, name="gpt2-serve-engine", daemon=True)
        # Row i's tokens so far (prompt and chosen) at their positions, for the repetition penalty; past its end,
        # its first token (a repeat the penalty ignores), so that the rows can be penalised as one batch.
        self.history = torch.zeros(max_batch, self.cache.capacity, dtype=torch.long, device=self.device)
        self._row_index = torch.arange(max_batch, device=self.device)

    # ---------------------------------------------------------------- the submitting side

    def start(self) -> float:
        """Start the scheduler thread and wait until it has warmed up every bucket (`warm_up`); the seconds that
        took. A failed warm-up is raised here."""
        self._thread.start()
        self._warmed.wait()
        if self._warm_up_error is not None:
            raise self._warm_up_error
        assert self.warm_up_s is not None
        return self.warm_up_s

    def submit(self, sequences: list[Sequence]) -> None:
        with self._wakeup:
            self._waiting.extend(sequences)
            self._wakeup.notify()

    def cancel(self, sequences: list[Sequence]) -> None:
        """Drop these sequences at the next step (a client that went away): their rows free at once."""
        for sequence in sequences:
            sequence.cancelled = True
        with self._wakeup:
            self._wakeup.notify()

    def cancel_all(self) -> None:
        """Cancel every sequence at the next step. Takes no lock, so a signal handler may call it."""
        self._cancel_all = True

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel whatever is waiting or running and end the thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout)

    @property
    def load(self) -> tuple[int, int]:
        """(active sequences, waiting sequences)."""
        return len(self.active), len(self._waiting)

    # ---------------------------------------------------------------- the scheduler thread

    def warm_up(self) -> None:
        """Run the step once per call CUDA graph trees need in every bucket: each shape is compiled and recorded
        before any request waits for it. On the scheduler thread, before it admits anything: graph trees are kept
        per thread, and the steps write (zeros) at position 0 of rows that are all free."""
        calls = device_rules(self.device).decode_warmup_calls  # CUDA graph trees: run, record, replay
        for rows, length in self.buckets.shapes:
            tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
            for _ in range(calls):
                self.step(tokens, self.cache, self.positions[:rows], length)

    def _run(self) -> None:
        with torch.inference_mode():
            started = time.perf_counter()
            try:
                self.warm_up()
            except BaseException as error:  # handed to `start`, on the thread that loads the server
                self._warm_up_error = error
                self._warmed.set()
                return
            synchronize(self.device)
            self.warm_up_s = time.perf_counter() - started
            self._warmed.set()
            while True:
                with self._wakeup:
                    while not self._stopping and not self._waiting and not self.active:
                        self._wakeup.wait()
                    if self._stopping:
                        break
                try:
                    self._drop_cancelled()
                    self._admit()
                    if self.active:
                        self._decode()
                except Exception as error:  # a failed step (e.g. out of memory) fails its sequences, not the server
                    traceback.print_exc()
                    for sequence in self.active:
                        self._finish(sequence, "cancelled", error=f"{type(error).__name__}: {error}")
                    self.active.clear()
        for sequence in [*self.active, *self._waiting]:
            self._finish(sequence, "cancelled")
        self.active.clear()
        self._waiting.clear()

    def _admit(self) -> None:
        """Prefill waiting sequences into free rows; they join the batch at the next step."""
        while len(self.active) < self.max_batch:
            with self._wakeup:
                if not self._waiting:
                    return
                sequence = self._waiting.popleft()
            if sequence.cancelled:
                self._finish(sequence, "cancelled")
                continue
            try:
                self._prefill(sequence)
            except Exception as error:
                self._finish(sequence, "cancelled", error=f"{type(error).__name__}: {error}")

    def _prefill(self, sequence: Sequence) -> None:
        sequence.tracker = TextTracker(self.tokenizer, sequence.options.stop)
        if self.prompt_lookup is not None:
            sequence.lookup = LookupHistory(sequence.prompt_ids)
        ids = torch.tensor([sequence.prompt_ids], dtype=torch.long, device=self.device)  # (1, T)
        if sequence.echo:
            self._score_prompt(sequence, ids)
        if sequence.options.max_new_tokens == 0:
            self._finish(sequence, "length")
            return
        row, length = len(self.active), ids.size(1)
        logits = self.model.next_token_logits(
            ids,
            self.cache,
            self.positions[row : row + 1].zero_(),
            self.generator.attend_length(self.cache, length),
            first_row=row,
        )
        self.positions[row] = length
        self.history[row] = sequence.prompt_ids[0]
        self.history[row, :length] = ids[0]
        token = self._choose(logits, [sequence], length, first_row=row)
        self.history[row, length : length + 1] = token
        self.active.append(sequence)
        if not self._accept(sequence, int(token), logits[0]):
            self._release(row)

    def _decode(self) -> None:
        """One step for every active sequence: each row at its own position."""
        if self.prompt_lookup is not None:
            drafts = [self._draft(sequence) for sequence in self.active]
            if any(drafts):
                self._decode_drafted(drafts)
                return
        n = len(self.active)
        end = max(len(s.prompt_ids) + s.steps for s in self.active) + 1
        rows, length = self.buckets.pick(n, end)
        # Padding rows are free rows: they compute at their position 0 (`_release`), and nothing reads them.
        last_tokens = [[sequence.last_token] for sequence in self.active] + [[0]] * (rows - n)
        tokens = torch.tensor(last_tokens, device=self.device)  # (rows, 1)
        logits = self.step(tokens, self.cache, self.positions[:rows], length)[:n]  # (n, V)
        chosen = self._choose(logits, self.active, end - 1)  # (n,)
        self.positions[:n] += 1
        self.history[self._row_index[:n], self.positions[:n]] = chosen
        tokens_host = chosen.tolist()  # the step's one sync
        finished = [
            row for row, sequence in enumerate(self.active) if not self._accept(sequence, tokens_host[row], logits[row])
        ]
        for row in reversed(finished):  # from the end, so each move keeps the earlier rows in place
            self._release(row)

    def _draft(self, sequence: Sequence) -> list[int]:
        """Up to `prompt_lookup` tokens that may follow the sequence, no more than it may still take after the
        step's own token."""
        assert sequence.lookup is not None and self.prompt_lookup is not None
        return sequence.lookup.draft(min(self.prompt_lookup, sequence.options.max_new_tokens - sequence.steps - 1))

    def _decode_drafted(self, drafts: list[list[int]]) -> None:
        """One verification pass `(n, N + 1)` over every active row's pending token and draft (padded with the
        pending token: what padding computes is never read, its cache slots are overwritten before they are)."""
        assert self.prompt_lookup is not None
        n, width = len(self.active), self.prompt_lookup + 1
        rows = [
            [sequence.last_token, *draft] + [sequence.last_token] * (width - 1 - len(draft))
            for sequence, draft in zip(self.active, drafts, strict=True)
        ]
        end = max(len(s.prompt_ids) + s.steps + len(d) for s, d in zip(self.active, drafts, strict=True)) + 1
        length = self.cache.attend_length(min(end, self.cache.capacity))
        tokens = torch.tensor(rows, device=self.device)  # (n, N + 1)
        logits = self.model.verify_logits(tokens, self.cache, self.positions[:n], length)  # (n, N + 1, V)
        # Rows without a draft choose as a plain step does (one batch, their own draws); the others verify theirs.
        plain = [row for row in range(n) if not drafts[row]]
        gains: list[list[int]] = [[] for _ in range(n)]
        if plain:
            chosen = self._choose(logits[plain, 0], [self.active[row] for row in plain], end - 1, rows=plain)
            for row, token in zip(plain, chosen.tolist(), strict=True):
                gains[row] = [token]
        for row, draft in enumerate(drafts):
            if draft:
                sequence = self.active[row]
                assert sequence.lookup is not None
                history = [sequence.lookup.tokens]
                row_logits = logits[row : row + 1, : len(draft) + 1]
                gains[row] = choose_with_drafts(row_logits, history, [Draft(draft)], sequence.options, sequence.rng)[0]
        finished = []
        for row, (sequence, gained) in enumerate(zip(self.active, gains, strict=True)):
            position = len(sequence.prompt_ids) + sequence.steps - 1  # of its pending token (`positions[row]`)
            for index, token in enumerate(gained):
                alive = self._accept(sequence, token, logits[row, index])
                if not alive:
                    finished.append(row)
                    break
            else:
                self.positions[row] = position + len(gained)
                self.history[row, position + 1 : position + 1 + len(gained)] = torch.tensor(gained, device=self.device)
        for row in reversed(finished):
            self._release(row)

    def _choose(
        self,
        logits: torch.Tensor,
        sequences: list[Sequence],
        width: int,
        first_row: int = 0,
        rows: list[int] | None = None,
    ) -> torch.Tensor:
        """The next token `(n,)` of the sequences in rows `first_row...` (or in `rows`), chosen as one batch: each
        row with its own options and one draw from its own generator when it samples, so its text depends on its
        seed alone. `width`: the longest row's tokens so far."""
        draws = [
            torch.rand(1, generator=s.rng, device=s.rng.device) if s.options.temperature != 0.0 else None
            for s in sequences
        ]
        uniforms = None
        if any(draw is not None for draw in draws):
            zero = torch.zeros(1, device=self.device)
            uniforms = torch.cat([zero if draw is None else draw.to(self.device) for draw in draws])  # (n,)
        if rows is None:
            history = self.history[first_row : first_row + len(sequences), :width]
        else:
            history = self.history[rows, :width]
        return choose_next_per_row(logits, history, [s.options for s in sequences], uniforms)

    def _accept(self, sequence: Sequence, token: int, logits: torch.Tensor) -> bool:
        """Record a chosen token and tell the client; False when the sequence is finished."""
        assert sequence.tracker is not None
        completion, pieces = sequence.completion, []
        before = len(completion.token_ids)
        alive = accept_token(
            completion,
            sequence.tracker,
            token,
            sequence.steps,
            sequence.options,
            lambda _row, piece: pieces.append(piece),
            0,
        )
        sequence.steps += 1
        sequence.last_token = token
        if sequence.lookup is not None:
            sequence.lookup.extend([token])
        text = "".join(pieces)
        # A stop string ends the text instead of a token. The end-of-text token is reported (with no text): scoring
        # clients read one log-probability per generated token, lm-evaluation-harness dropping the last one.
        ended = completion.finish_reason == "eot"
        if (len(completion.token_ids) > before and completion.finish_reason != "stop") or ended:
            logprob, top = self._logprobs(logits, token, sequence.logprobs)
            self._emit(sequence, TokenGenerated(sequence.choice, token, "" if ended else text, logprob, top))
            text = text if ended else ""
        if not alive:
            self._finish(sequence, _FINISH_REASONS[completion.finish_reason or "length"], text=text)
        return alive

    @staticmethod
    def _logprobs(logits: torch.Tensor, token: int, count: int | None) -> tuple[float | None, TopLogprobs | None]:
        if count is None:
            return None, None
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (V,)
        top = torch.topk(logprobs, count) if count else None
        top_pairs = list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else []
        return float(logprobs[token]), top_pairs

    def _score_prompt(self, sequence: Sequence, ids: torch.Tensor) -> None:
        """Log-probabilities of each prompt token given the ones before it (a plain forward pass)."""
        logits, _ = self.model(ids)  # (1, T, V)
        logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # (T-1, V): predictions of tokens 1...
        targets = ids[0, 1:]
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        count = sequence.logprobs or 0
        top: list[TopLogprobs | None] = [None]
        if count:
            values, indices = torch.topk(logprobs, count, dim=-1)
            top += [list(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
        else:
            top += [[] for _ in chosen]
        self._emit(sequence, PromptScored(sequence.choice, [None, *chosen], top))

    def _release(self, row: int) -> None:
        """Free a row: the last active row moves into it (only its filled positions are copied)."""
        last = len(self.active) - 1
        if row != last:
            moved = self.active[last]
            filled = len(moved.prompt_ids) + moved.steps
            for keys, values in zip(self.cache.keys, self.cache.values, strict=True):
                keys[row, :, :filled] = keys[last, :, :filled]
                values[row, :, :filled] = values[last, :, :filled]
            self.history[row] = self.history[last]
            self.positions[row] = self.positions[last]
            self.active[row] = moved
        self.active.pop()
        self.positions[last] = 0  # a free row a padded step computes stays inside the position table

    def _drop_cancelled(self) -> None:
        if self._cancel_all:
            for sequence in [*self.active, *self._waiting]:
                sequence.cancelled = True
        for row in reversed(range(len(self.active))):
            if self.active[row].cancelled:
                self._finish(self.active[row], "cancelled")
                self._release(row)

    def _finish(self, sequence: Sequence, reason: str, text: str = "", error: str | None = None) -> None:
        self._emit(sequence, Finished(sequence.choice, reason, text, error))

    @staticmethod
    def _emit(sequence: Sequence, event: Event) -> None:
        try:
            sequence.emit(event)
        except RuntimeError:  # the receiving event loop has closed: nobody is listening any more
            sequence.cancelled = True
