"""The records generation passes around: the sampling options, a completion, and the timing and draft counts
of a run. A leaf module: the generator, the logit filters, drafting and the server all read these."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eot: bool = False


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "length", "eot" or "stop"


@dataclass
class Timing:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    # Drafting: draft tokens proposed and accepted (not those past where a row finished:
    # `drafting.count_draft`), (row, forward pass) pairs of the decode, and how many drafts kept 0, 1, 2, ...
    # of their tokens.
    drafted: int = 0
    accepted: int = 0
    row_passes: int = 0
    accepted_lengths: dict[int, int] = field(default_factory=dict)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens each sequence gained per decode forward pass (1 without drafting)."""
        return self.decode_tokens / self.row_passes if self.row_passes else 0.0

    def add(self, other: Timing) -> None:
        """Accumulate another run's counts and times (several batches make one report)."""
        self.prefill_tokens += other.prefill_tokens
        self.prefill_s += other.prefill_s
        self.decode_tokens += other.decode_tokens
        self.decode_s += other.decode_s
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.row_passes += other.row_passes
        for length, count in other.accepted_lengths.items():
            self.accepted_lengths[length] = self.accepted_lengths.get(length, 0) + count
