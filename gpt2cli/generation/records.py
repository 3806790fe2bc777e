"""The records generation passes around: the sampling options, a completion, and the timing and draft counts
of a run. The generator, the logit filters, drafting and the server all read these."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from gpt2cli.settings.sections import SampleSettings

_SAMPLE = SampleSettings.model_construct()  # the settings' defaults, unvalidated: the one place they are written


@dataclass(frozen=True)
class SamplingOptions:
    """How the next token is chosen and when a sequence stops. The fields are `gpt2 sample`'s settings of the same
    names, with their defaults; unvalidated here, since each caller checks them its own way (the settings for the
    command line, the request schema for the server, which allows `max_tokens` 0)."""

    max_new_tokens: int = _SAMPLE.max_new_tokens
    temperature: float = _SAMPLE.temperature  # 0: greedy
    top_k: int | None = _SAMPLE.top_k
    top_p: float = _SAMPLE.top_p
    min_p: float = _SAMPLE.min_p
    repetition_penalty: float = _SAMPLE.repetition_penalty
    stop: tuple[str, ...] = tuple(_SAMPLE.stop)
    ignore_eot: bool = _SAMPLE.ignore_eot

    @classmethod
    def from_settings(cls, settings: SampleSettings) -> SamplingOptions:
        """The options `gpt2 sample`'s validated settings ask for."""
        values = {field.name: getattr(settings, field.name) for field in fields(cls)}
        return cls(**{**values, "stop": tuple(settings.stop)})


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
    # Compiling and warming up the decode step at every length it will attend to, before the clock of decode_s
    # starts (0 eager): apart, so that the decode rate is the steady state a longer run keeps.
    warmup_s: float = 0.0
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
        self.warmup_s += other.warmup_s
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.row_passes += other.row_passes
        for length, count in other.accepted_lengths.items():
            self.accepted_lengths[length] = self.accepted_lengths.get(length, 0) + count
