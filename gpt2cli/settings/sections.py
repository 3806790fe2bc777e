"""Every option of every command, validated in one place.

Sources, lowest to highest priority: field defaults < a TOML file (`--config FILE` or `GPT2_CONFIG`;
the seed project's YAML layout is accepted too) < environment variables (`GPT2_` prefix, `__`
between levels: `GPT2_DATA__WORKERS=4`) < command-line flags (passed as init values).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from gpt2cli.data.shard_format import MAX_SHARD_TOKENS
from gpt2cli.errors import UsageError
from gpt2cli.model.lora_targets import DEFAULT_TARGETS, TARGETS, resolve_targets
from gpt2cli.model.presets import PRESETS, PresetName
from gpt2cli.settings.sources import read_config_file
from gpt2cli.settings.types import (
    CONFIG_ENV_VAR,
    CompileMode,
    DataFormat,
    Device,
    Dtype,
    EncodingErrors,
    GroupSize,
    LossOn,
    MuonAdjustLr,
    OptimizerName,
    OutputFormat,
    Parallel,
    PlotMetric,
    PlotX,
    Quantize,
    Schedule,
    StorageDtype,
    Task,
    Tracker,
    comma_list,
)

# The embedded default run, about six minutes on two CPU cores; its recipe: the #15 sweep in benchmarks/README.md.
DEFAULT_RUN: dict[str, dict[str, Any]] = {
    "model": {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256},
    "train": {
        "batch_size": 8,
        "optimizer": "muon",
        "lr": 3e-3,
        "muon_lr": 0.02,
        "weight_decay": 0.0,
        "schedule": "wsd",
        "decay_fraction": 0.6,
        "max_steps": 600,
        "warmup_steps": 25,
        "eval_interval": 100,
        "eval_tokens": 32768,
        "log_interval": 10,
        "save_interval": 100,
    },
}


class Section(BaseModel):
    """One table of the configuration file; a misspelt key is an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class ModelSettings(Section):
    """The network's shape. Unset dimensions come from `preset` (default `gpt2`, the 124M model)."""

    preset: PresetName = Field("gpt2", description="Named GPT-2 shape (gpt2 is the 124M model).")
    n_layer: int | None = Field(None, ge=1, description="Transformer blocks (default: the preset's).")
    n_head: int | None = Field(None, ge=1, description="Attention heads per block (default: the preset's).")
    n_embd: int | None = Field(None, ge=1, description="Model width (default: the preset's).")
    block_size: int | None = Field(None, ge=1, description="Context length in tokens (default: the preset's, 1024).")
    vocab_size: int | None = Field(None, ge=1, description="Vocabulary size (default: 50257).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability, 0 for pretraining.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelSettings:
        width = self.n_embd or PRESETS[self.preset].n_embd
        heads = self.n_head or PRESETS[self.preset].n_head
        if width % heads:
            raise ValueError(f"n_embd ({width}) must be divisible by n_head ({heads})")
        return self

    def to_config(self) -> Any:
        """The `GPT2Config` these settings describe (imports torch)."""
        from gpt2cli.model.gpt2 import GPT2Config

        explicit = {
            name: getattr(self, name)
            for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
            if getattr(self, name) is not None
        }
        return GPT2Config.from_preset(self.preset, dropout=self.dropout, **explicit)


class DataSettings(Section):
    """How text becomes tokens: shared by `tokenize` and every command that reads text."""

    paths: list[str] = Field(default_factory=list, description="Input files (text, .jsonl, .parquet or .bin shards).")
    text_field: str = Field("text", min_length=1, description="Field (.jsonl) or column (.parquet) with the text.")
    workers: int = Field(0, ge=0, description="Tokenizer processes; 0 uses one per core.")
    shard_size: int | None = Field(
        None, ge=1, le=MAX_SHARD_TOKENS, description="Tokens per output shard (default: a single file)."
    )
    token_limit: int | None = Field(None, ge=1, description="Shards (-o): stop after N tokens, separators included.")
    val_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_SHARD_TOKENS,
        description="Shards (-o): the first N tokens to NAME_val_000000.bin, the rest to "
        "NAME_train_000001.bin, ... (llm.c's split).",
    )
    errors: EncodingErrors = Field(
        "strict", description="Bytes that are not UTF-8: 'strict' stops with an error, 'replace' substitutes U+FFFD."
    )
    allow_special: bool = Field(False, description="Encode '<|endoftext|>' in the text as the special token 50256.")
    cache_dir: str | None = Field(
        None, description="Where tokenized text is cached (default: $XDG_CACHE_HOME/gpt2cli or ~/.cache/gpt2cli)."
    )
    format: DataFormat = Field(
        "auto",
        description="Records of .jsonl/.parquet files: text (a text field), prompt-completion (prompt and completion "
        "fields) or messages (a list of role/content turns); auto: from the records' fields.",
    )
    loss_on: LossOn = Field(
        "completion",
        description="Fine-tuning records: the loss on the completions (prompt-completion) or the assistant turns "
        "(messages) only, or on all tokens.",
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template FILE (or 'default') rendering messages records; default: the one "
        "--init-from carries, else the built-in one.",
    )


class TrainSettings(Section):
    """Optimisation and run bookkeeping for `gpt2 train` (the llm.c GPT-2 recipe by default)."""

    device: Device = "auto"
    dtype: Dtype = Field("auto", description="Compute dtype; auto picks the best for the device.")
    compile: CompileMode = Field(
        "auto",
        description="Compile the transformer blocks and the loss with torch.compile; neither flag (auto): compile "
        "where Inductor works here (a C++ compiler on the CPU, Triton on CUDA) and the run is long enough to repay it.",
    )
    parallel: Parallel = Field(
        "ddp",
        description="Under torchrun: ddp keeps a full model on every process; fsdp shards weights, gradients and "
        "optimizer state across them (FSDP2, for models too large for one device).",
    )
    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch (per process under torchrun).")
    seq_len: int | None = Field(None, ge=1, description="Tokens per sequence (default: the block size).")
    total_batch_tokens: int | None = Field(
        None, ge=1, description="Tokens per optimizer step; gradient accumulation makes up the difference."
    )
    optimizer: OptimizerName = Field("adamw", description="muon: Muon on the blocks' 2-D matrices, AdamW on the rest.")
    lr: float = Field(6e-4, gt=0, description="Peak learning rate (of AdamW; under muon, of the AdamW weights).")
    muon_lr: float = Field(0.02, gt=0, description="Muon's peak learning rate; the schedule scales it like --lr.")
    muon_adjust_lr: MuonAdjustLr = Field("original", description="Muon's per-matrix lr scale (torch's adjust_lr_fn).")
    min_lr: float | None = Field(None, ge=0, description="Final learning rate (default: lr / 10).")
    warmup_steps: int | None = Field(None, ge=0, description="Linear warmup steps (default: from the run length).")
    schedule: Schedule = Field("cosine", description="Learning-rate schedule.")
    decay_fraction: float = Field(0.2, ge=0, le=1, description="wsd: share of the steps after warmup spent decaying.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run.")
    epochs: float | None = Field(None, gt=0, description="Passes over the training tokens.")
    max_tokens: int | None = Field(None, ge=1, description="Training tokens to process.")
    weight_decay: float = Field(0.1, ge=0, description="Weight decay on 2-D weights only (AdamW and Muon).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this value.")
    schedule_steps: int | None = Field(
        None, ge=1, description="Steps the learning-rate schedule spans (default: the run's length)."
    )
    val_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of the training tokens held out (from the end) for validation."
    )
    val_data: list[str] = Field(default_factory=list, description="Validation files instead of a held-out share.")
    init_from: str | None = Field(None, description="Start from this checkpoint (ours, a run folder or transformers').")
    resume: bool = Field(False, description="Continue the run in --out from its last checkpoint.")
    out: str | None = Field(None, description="Run folder (default: a new folder under runs/).")
    log_interval: int = Field(10, ge=1, description="Steps between log lines.")
    eval_interval: int = Field(250, ge=1, description="Steps between validation passes.")
    eval_tokens: int = Field(65536, ge=1, description="Validation tokens per evaluation.")
    hellaswag: str | None = Field(
        None, description="HellaSwag .jsonl scored at every evaluation (hellaswag_acc, hellaswag_acc_norm in metrics)."
    )
    hellaswag_limit: int | None = Field(None, ge=1, description="Score only the first N HellaSwag examples.")
    save_interval: int = Field(1000, ge=1, description="Steps between checkpoints.")
    keep: int = Field(1, ge=1, description="Checkpoints to keep.")
    keep_best: bool = Field(
        False, description="Also keep the checkpoint with the lowest validation loss, as checkpoints/best."
    )
    early_stop: int | None = Field(
        None, ge=1, description="Stop after N evaluations without a lower validation loss (saving first)."
    )
    seed: int = Field(1337, ge=0, description="Random seed.")
    log_to: Annotated[list[Tracker], NoDecode, BeforeValidator(comma_list)] = Field(
        default_factory=list, description="Also log to these trackers: tensorboard, wandb (comma list)."
    )
    memory_check: bool = Field(
        True, description="On the CPU, refuse a run whose estimated memory exceeds what is available."
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each block's activations in the backward pass instead of keeping them: far less "
        "activation memory for about a third more compute.",
    )
    lora_rank: int | None = Field(
        None,
        ge=1,
        description="Fine-tune --init-from with LoRA adapters of this rank: the model stays frozen (in bf16 where the "
        "run computes in bf16), only the adapters train; the run saves the merged model.",
    )
    lora_alpha: float = Field(
        16.0, gt=0, description="LoRA's scale: the adapters' update is multiplied by alpha / rank."
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    lora_targets: Annotated[list[str], NoDecode, BeforeValidator(comma_list)] = Field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        description="Projections given adapters in every block (comma list): " + ", ".join(TARGETS) + ".",
    )
    save_adapters: bool = Field(
        False, description="With --lora-rank: also keep adapters.safetensors in the run folder."
    )

    @field_validator("lora_targets")
    @classmethod
    def _known_targets(cls, names: list[str]) -> list[str]:
        return list(resolve_targets(names))  # full paths: `c_fc` is `mlp.c_fc`; `c_proj` alone is refused

    @model_validator(mode="after")
    def _one_run_length(self) -> TrainSettings:
        given = [name for name in ("max_steps", "epochs", "max_tokens") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of max_steps, epochs, max_tokens (got {', '.join(given)})")
        return self

    @model_validator(mode="after")
    def _lora_adapts_a_model(self) -> TrainSettings:
        # A resume reads init_from from the run's saved settings (then checked again, with the flags laid over them).
        if self.lora_rank is not None and self.init_from is None and not self.resume:
            raise ValueError("lora_rank needs init_from: the model the adapters fine-tune")
        if self.save_adapters and self.lora_rank is None:
            raise ValueError("save_adapters needs lora_rank")
        return self

    @model_validator(mode="after")
    def _best_needs_validation(self) -> TrainSettings:
        wanted = [name for name in ("keep_best", "early_stop") if getattr(self, name)]
        if wanted and self.val_fraction == 0 and not self.val_data:
            flags = " and ".join("--" + name.replace("_", "-") for name in wanted)
            verb = "need" if len(wanted) > 1 else "needs"
            raise ValueError(f"{flags} {verb} validation data: give --val-data or a --val-fraction above 0")
        return self


class GenerationWeights(Section):
    """How `gpt2 sample` and `gpt2 serve` load a checkpoint and run its decode step."""

    device: Device = "auto"
    dtype: StorageDtype = Field("float32", description="Weights and compute dtype (float32 is exact).")
    quantize: Quantize = Field("none", description="Weight-only quantization: int8 per row, int4 per group.")
    group_size: GroupSize = 32
    compile: bool = Field(
        False,
        description="Compile the decode step: CUDA graphs on GPU; on the CPU ~2.5x faster float32 decoding (one-row "
        "products as streaming loops with AVX-512) after a first compile of ~25 s, cached for later runs.",
    )


class SampleSettings(GenerationWeights):
    """Text generation for `gpt2 sample`."""

    max_new_tokens: int = Field(256, ge=1, description="Tokens to generate per sample.")
    temperature: float = Field(1.0, ge=0, description="Softmax temperature; 0 is greedy (always the likeliest token).")
    top_k: int | None = Field(None, ge=1, le=50257, description="Sample only from the k likeliest tokens.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the likeliest tokens covering this mass.")
    min_p: float = Field(0.0, ge=0, lt=1, description="Drop tokens less likely than min_p × the likeliest one.")
    repetition_penalty: float = Field(1.0, gt=0, description="Divide the logits of tokens already present (CTRL).")
    num_samples: int = Field(1, ge=1, description="Samples per prompt (generated as one batch).")
    seed: int | None = Field(None, ge=0, description="Random seed: the same seed gives the same text.")
    stop: list[str] = Field(default_factory=list, description="Stop just before this text (repeatable).")
    ignore_eot: bool = Field(False, description="Keep going past <|endoftext|> instead of stopping there.")
    prompt_lookup: int | None = Field(
        None,
        ge=1,
        description="Prompt-lookup decoding: draft up to N tokens a step by matching the last tokens against earlier "
        "text (prompt and output) and verify them in one pass; fast where the output repeats its input. Greedy "
        "float32 output is unchanged (in bf16 or quantized a near-tie can flip); sampling keeps its distribution, "
        "but a seed gives other text.",
    )

    @field_validator("stop")
    @classmethod
    def _stops_are_text(cls, stops: list[str]) -> list[str]:
        if any(not stop for stop in stops):  # "" would stop before the first token (the server refuses it too)
            raise ValueError("a stop string cannot be empty")
        return stops


class ChatSettings(SampleSettings):
    """`gpt2 chat`: `gpt2 sample`'s decoding and weights, one reply per turn, and the system message."""

    max_new_tokens: int = Field(256, ge=1, description="Most tokens in one reply.")
    system: str | None = Field(None, min_length=1, description="A system message that opens the conversation.")

    @model_validator(mode="after")
    def _one_reply_to_the_end_of_turn(self) -> ChatSettings:
        if self.num_samples != 1:
            raise ValueError("num_samples: a chat answers each message once")
        if self.ignore_eot:
            raise ValueError("ignore_eot: a chat reply ends at the template's end of turn")
        return self


class EvalSettings(Section):
    """Evaluation for `gpt2 eval`."""

    task: Task = Field("lm", description="lm: loss and perplexity; hellaswag: multiple choice.")
    context: int | None = Field(None, ge=1, description="Tokens per window (default: the model's block size).")
    stride: int | None = Field(None, ge=1, description="Tokens between window starts (default: the context).")
    max_tokens: int | None = Field(None, ge=2, description="Score at most this many tokens.")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    limit: int | None = Field(None, ge=1, description="Multiple choice: evaluate the first N examples.")
    device: Device = "auto"
    dtype: Dtype = Field("float32", description="Compute dtype (float32 is exact; auto picks the best for the device).")
    quantize: Quantize = Field("none", description="Score the weights as quantized for inference (int8, int4).")
    group_size: GroupSize = 32

    @model_validator(mode="after")
    def _stride_fits(self) -> EvalSettings:
        if self.stride is not None and self.context is not None and self.stride > self.context:
            raise ValueError(f"stride ({self.stride}) must not exceed context ({self.context})")
        return self


class BenchSettings(Section):
    """`gpt2 bench`: what to measure and how often."""

    tests: list[str] = Field(["train", "fwd", "pp512", "tg128"], description="train, fwd, ppN, tgN (comma list).")
    batch_sizes: list[int] = Field([8], min_length=1, description="Batch sizes (comma list).")
    seq_lens: list[int] = Field(
        default_factory=list, description="Sequence lengths for train and fwd (comma list; default: the block size)."
    )
    reps: int = Field(5, ge=1, description="Timed runs per case.")
    warmup: int = Field(1, ge=0, description="Untimed runs first (compilation happens here).")
    device: Device = "auto"
    dtype: Dtype = Field("auto", description="Compute dtype; auto picks the best for the device.")
    compile: bool = Field(
        False, description="Compile the model with torch.compile (blocks for train, CUDA graphs for decode)."
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="Device peak for MFU (default: from the known-GPU table)."
    )
    quantize: Quantize = Field("none", description="fwd, ppN, tgN: weight-only int8 or int4 weights.")
    group_size: GroupSize = 32
    output_format: OutputFormat = Field("table", description="How to print results.")

    @model_validator(mode="after")
    def _positive_lists(self) -> BenchSettings:
        for name in ("batch_sizes", "seq_lens"):
            bad = [value for value in getattr(self, name) if value < 1]
            if bad:
                raise ValueError(f"{name} must be at least 1, got {bad[0]}")
        return self


class PlotSettings(Section):
    """`gpt2 plot`: which curves, against what, and how."""

    metrics: Annotated[list[PlotMetric], NoDecode, BeforeValidator(comma_list)] = Field(
        ["loss", "val_loss"],
        min_length=1,
        description="Metrics to draw (comma list): " + ", ".join(PlotMetric.__args__),
    )
    x: PlotX = Field("step", description="The x axis: step, tokens or time (seconds).")
    smooth: int = Field(1, ge=1, description="Average each point with the N-1 before it (1: no smoothing).")
    log_y: bool = Field(False, description="Logarithmic y axis.")
    width: int | None = Field(None, ge=20, description="Terminal chart width in columns (default: the terminal's).")
    height: int | None = Field(None, ge=10, description="Terminal chart height in rows (default: from the terminal).")


class ServeSettings(GenerationWeights):
    """`gpt2 serve`: the OpenAI-compatible HTTP server."""

    host: str = Field("127.0.0.1", min_length=1, description="Address to listen on (0.0.0.0: every interface).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port, printed at start).")
    max_batch: int = Field(16, ge=1, le=1024, description="Sequences decoded together; more wait for a free slot.")
    api_key: str | None = Field(
        None, min_length=1, description="Require 'Authorization: Bearer KEY' (also GPT2_SERVE__API_KEY)."
    )
    model_name: str | None = Field(None, min_length=1, description="Model id in the API (default: the checkpoint's).")
    max_n: int = Field(16, ge=1, description="Largest n (completions per prompt) a request may ask for.")
    max_prompts: int = Field(64, ge=1, description="Most prompts in one request.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body in bytes (else 413).")
    json_logs: bool = Field(False, description="Request logs on stderr as JSON lines.")
    prompt_lookup: int | None = Field(
        None,
        ge=1,
        description="Prompt-lookup decoding per sequence: draft up to N tokens from earlier text and verify them in "
        "one pass (as gpt2 sample --prompt-lookup); greedy float32 output is unchanged.",
    )


class Settings(BaseSettings):
    """All sections. Build it with `load_settings`, which applies the configuration file."""

    model_config = SettingsConfigDict(
        env_prefix="GPT2_", env_nested_delimiter="__", extra="forbid", nested_model_default_partial_update=True
    )

    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    sample: SampleSettings = Field(default_factory=SampleSettings)
    chat: ChatSettings = Field(default_factory=ChatSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    bench: BenchSettings = Field(default_factory=BenchSettings)
    plot: PlotSettings = Field(default_factory=PlotSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)


class SettingsError(UsageError):
    """Invalid settings; the message holds one line per problem."""


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{location}: unknown setting"
    value = error.get("input")
    shown = "" if isinstance(value, Mapping) else f" (got {value!r})"
    return f"{location}: {message}{shown}" if location else f"{message}{shown}"


def load_settings(
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    profile: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve every source into one validated `Settings`.

    `overrides` are the command-line flags actually given, as `{"section": {"field": value}}`; `profile` replaces
    field defaults (lowest priority), as the embedded default training run does.
    """
    config_file = config_file or os.environ.get(CONFIG_ENV_VAR) or None
    file_values = read_config_file(config_file) if config_file else {}

    class ResolvedSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            file_source = InitSettingsSource(settings_cls, file_values)
            return init_settings, env_settings, file_source, InitSettingsSource(settings_cls, dict(profile or {}))

    try:
        return ResolvedSettings(**dict(overrides or {}))
    except ValidationError as error:
        raise SettingsError("\n".join(_describe(e) for e in error.errors(include_url=False))) from None
