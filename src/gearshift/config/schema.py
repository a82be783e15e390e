"""The typed configuration schema (pydantic v2).

Every section forbids unknown keys so that a typo is an error with a did-you-mean, never a
silently ignored setting. Defaults are the embedded default recipe: a small byte-level
Llama-architecture model trained on the Python reference manual that ships with CPython.
"""

from __future__ import annotations

import datetime
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gearshift.schedules import resolve_schedule_name


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelBuild(Section):
    """Sizes of a Llama-architecture causal LM built from scratch (no files needed)."""

    architecture: Literal["llama"] = Field("llama", description="model family built")
    hidden_size: int = Field(128, ge=1, description="width of the residual stream")
    intermediate_size: int = Field(352, ge=1, description="width of the MLP")
    num_hidden_layers: int = Field(3, ge=1, description="number of transformer blocks")
    num_attention_heads: int = Field(4, ge=1, description="query heads per block")
    num_key_value_heads: int | None = Field(
        None, ge=1, description="key/value heads (grouped-query attention); default = heads"
    )
    max_position_embeddings: int = Field(512, ge=1, description="longest sequence supported")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    tie_word_embeddings: bool = Field(False, description="share input and output embeddings")
    dropout: float = Field(0.0, ge=0.0, le=1.0, description="attention dropout")


class ModelConfig(Section):
    """Where the model comes from: a local Hugging Face directory, or built from sizes."""

    path: str | None = Field(
        None, description="local Hugging Face model directory, or a LoRA adapter directory to "
        "continue (its base is the model adapter_config.json names); when null the model is built"
    )
    build: ModelBuild = Field(default_factory=ModelBuild)
    tokenizer: Literal["auto", "byte"] = Field(
        "auto",
        description="'byte' = built-in byte-level tokenizer (no files); "
        "'auto' = from model.path when set, else byte",
    )


class SyntheticData(Section):
    """A built-in verifiable task (``gearshift.data.synthetic``) as chat conversations."""

    name: str = Field(..., min_length=1, description="a synthetic task: addition, reverse, "
                      "sort_digits")
    num_train: int = Field(2000, ge=1, description="training problems")
    num_eval: int = Field(200, ge=1, description="held-out problems (never a training prompt)")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="the task's options, e.g. {digits: 2}")


class DataConfig(Section):
    """Training text: the built-in corpus, plain-text files, JSONL files or a synthetic task."""

    source: Literal["pydoc_topics", "text", "jsonl", "synthetic"] = Field(
        "pydoc_topics",
        description="pydoc_topics = the Python reference manual shipped with CPython; "
        "synthetic = a built-in verifiable chat task (task: sft)",
    )
    synthetic: SyntheticData | None = Field(
        None, description="with source synthetic: {name, num_train, num_eval, options}")
    paths: list[str] = Field(default_factory=list, description="files for text / jsonl")
    text_field: str = Field("text", description="JSONL field holding plain text")
    messages_field: str = Field("messages", description="JSONL field holding chat messages")
    seq_len: int = Field(256, ge=2, description="tokens per packed training sequence")
    eval_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="fraction of documents held out for evaluation"
    )
    max_eval_sequences: int | None = Field(
        256, ge=1, description="cap on held-out sequences evaluated (null = all)"
    )
    on_error: Literal["error", "skip"] = Field(
        "error", description="bad JSONL line: stop with file:line, or skip and count it"
    )


class OptimConfig(Section):
    """AdamW hyperparameters."""

    name: Literal["adamw", "sgd"] = Field("adamw", description="optimizer: adamw or sgd")
    learning_rate: float = Field(3e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay (not on biases / norms)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas, each in [0, 1)")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    momentum: float = Field(0.0, ge=0, description="SGD only")


    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(math.isfinite(b) and 0.0 <= b < 1.0 for b in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value


class ScheduleConfig(Section):
    """The learning-rate schedule (see `gearshift.schedules`)."""

    name: str = Field("warmup_cosine", description="schedule name (or alias)")
    warmup_steps: int | None = Field(None, ge=0, description="warmup in optimizer steps")
    warmup_ratio: float | None = Field(
        0.05, ge=0.0, lt=1.0,
        description="warmup as a fraction of total steps (replaced by any other warmup form "
        "given in a higher layer)",
    )
    warmup_epochs: int | None = Field(None, ge=0, description="warmup in epochs")
    warmup_start_factor: float = Field(
        0.0, ge=0.0, le=1.0, description="LR multiplier at step 0, rising linearly to 1"
    )
    min_lr_ratio: float = Field(0.1, description="floor of the LR as a fraction of the peak")
    interval: Literal["step", "epoch"] = Field(
        "step", description="advance the schedule per optimizer step or per epoch"
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="shape-specific options (e.g. num_cycles, power)"
    )

    @field_validator("name")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        try:
            return resolve_schedule_name(value)
        except ValueError as exc:
            problems = getattr(exc, "problems", None)
            raise ValueError("; ".join(p.message for p in problems) if problems else str(exc)) \
                from None


class TrainingConfig(Section):
    """Length of the run, batch, accumulation, clipping, precision, evaluation."""

    max_steps: int | None = Field(
        None, ge=1, description="optimizer steps; when set, wins over epochs"
    )
    epochs: int = Field(2, ge=1, description="passes over the training data")
    batch_size: int = Field(8, ge=1, description="samples per micro-batch")
    accumulate_grad_batches: int = Field(1, ge=1, description="micro-batches per optimizer step")
    grad_clip: float | None = Field(1.0, ge=0, description="clip threshold; null or 0 = off")
    grad_clip_algorithm: Literal["norm", "value"] = Field(
        "norm", description="clip the global norm, or each gradient element")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="compute precision through Accelerate (fp16 uses a loss scaler)")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward to save memory")
    eval_every: int | None = Field(100, ge=1, description="evaluate every N steps (null = end)")
    log_every: int = Field(10, ge=1, description="write metrics every N steps")
    drop_last: bool = Field(False, description="drop a short last micro-batch of each epoch")


class CheckpointConfig(Section):
    """When to checkpoint, how many to keep, and whether training waits for the disk."""

    # ``async`` is a Python keyword: the field is ``async_`` in code and ``async`` everywhere else.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)

    enabled: bool = Field(True, description="write checkpoints at all")
    every: int = Field(100, ge=1, description="checkpoint every N optimizer steps")
    keep_last: int = Field(3, ge=1, description="checkpoints kept on disk (newest)")
    async_: bool = Field(
        True, alias="async", description="training waits only while the state is copied to "
        "host memory; a background thread writes, hashes, fsyncs and commits the checkpoint "
        "(saved synchronously when host memory could not hold the copy)")
    on_error: Literal["stop", "warn"] = Field(
        "stop", description="a checkpoint that cannot be written (disk full, permission "
        "denied): stop with a clear message, or warn and keep training")


class LoggingConfig(Section):
    """Where metrics go."""

    tensorboard: bool = Field(True, description="write TensorBoard scalars to RUN_DIR/tensorboard")
    wandb: bool = Field(False, description="also log to Weights & Biases (pip install 'gearshift[wandb]')")
    wandb_project: str = Field("gearshift", description="W&B project name")
    progress_bar: bool = Field(True, description="show a progress bar with loss, LR and throughput")


class LoraConfig(Section):
    """LoRA adapters through PEFT; their alphas can follow the phase controller."""

    enabled: bool = Field(False, description="train LoRA adapters instead of the whole model")
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="starting alpha (phases may change it)")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"],
        description="module names (or name suffixes) that get adapters")
    groups: dict[str, str] | None = Field(
        None, description="named groups by module-name regex, e.g. {attn: 'self_attn'}; "
        "default: by layer type (linear, conv)")
    use_rslora: bool = Field(False, description="rank-stabilized scale alpha / sqrt(r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout")


class QuantRamp(Section):
    """How the quantization strength λ rises from 0 to 1 at the start of QAT."""

    steps: int = Field(0, ge=0, description="optimizer steps over which λ rises from 0 to 1; "
                       "0 = fully quantized from step 1 (plain QAT)")
    shape: str = Field("linear", description="shape of the rise: λ = 1 − (the schedule's "
                       "multiplier) of any LR schedule name, e.g. linear, warmup_cosine")

    @field_validator("shape")
    @classmethod
    def _known_shape(cls, value: str) -> str:
        try:
            name = resolve_schedule_name(value)
        except ValueError as exc:
            problems = getattr(exc, "problems", None)
            raise ValueError("; ".join(p.message for p in problems) if problems else str(exc)) \
                from None
        if name in ("constant", "plateau"):
            raise ValueError(f"{value!r} never rises; use a decaying shape such as linear or "
                             "warmup_cosine")
        return name


class QuantizationConfig(Section):
    """Quantization-aware training (a model transform; see ``gearshift.transforms.bitnet``)."""

    method: Literal["bitnet_b158"] | None = Field(
        None, description="bitnet_b158 = ternary weights (absmean) and 8-bit activations "
        "(per-token absmax) with a straight-through estimator; null = no quantization")
    modules: list[str] | None = Field(
        None, description="Linear layers quantized: module names, name suffixes or regexes; "
        "null = every Linear except lm_head")
    exclude: list[str] = Field(
        default_factory=list, description="Linear layers left in full precision: names, "
        "suffixes or regexes")
    activation_bits: int = Field(8, ge=2, le=8, description="bits of the per-token "
                                 "activation quantization (export needs 8)")
    ramp: QuantRamp = Field(default_factory=QuantRamp)

    @field_validator("modules", "exclude")
    @classmethod
    def _patterns_compile(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression ({exc}); "
                                 "escape special characters or give the plain module name") \
                    from None
        return value


class RecoveryConfig(Section):
    """What the loop does when a step runs out of memory or goes non-finite."""

    oom: bool = Field(True, description="on out-of-memory, re-run the batch in halved "
                      "micro-batches instead of failing")
    max_consecutive_nonfinite: int = Field(
        3, ge=1, description="non-finite steps in a row before rolling back to the last "
        "good checkpoint")
    rollback_lr_factor: float = Field(
        0.5, gt=0, le=1, description="LR multiplier applied at each rollback")
    max_rollbacks: int = Field(
        2, ge=0, description="rollbacks allowed before the run stops with a clear message")
    max_consecutive_oom_skips: int = Field(
        10, ge=1, description="steps in a row skipped because one sample does not fit in "
        "memory before the run stops")


class FaultsConfig(Section):
    """Fault injection for tests and drills (off by default)."""

    oom_when_batch_above: int | None = Field(
        None, ge=0, description="raise a real torch.OutOfMemoryError when a forward pass gets "
        "more than N samples (0: every forward pass)")
    nan_at_steps: list[int] = Field(
        default_factory=list, description="make the loss of these optimizer steps NaN: each entry "
        "spoils one attempt, so repeat a step to make it fail several times in a row")
    checkpoint_write_delay_s: float = Field(
        0.0, ge=0.0, description="the checkpoint writer sleeps this long after each file it "
        "writes (a slow disk, to kill or stop a run mid-write)")


class ProfileConfig(Section):
    """The system prompt of chat runs: a named profile and what fills its placeholders."""

    name: str = Field("default", min_length=1, description="a built-in profile (default, "
                      "concise, none) or a path to a profile YAML file")
    variables: dict[str, str] = Field(default_factory=dict,
                                      description="values for the profile's own placeholders")
    date: str | None = Field(None, description="YYYY-MM-DD for {date} and {weekday}; null = "
                             "the day the run starts (then written here, so a resume keeps it)")
    policy: Literal["replace", "keep", "prepend"] = Field(
        "replace", description="a conversation with its own system message: replace it with "
        "the profile's, keep it, or put the profile's first")

    @field_validator("date", mode="before")
    @classmethod
    def _iso_date(cls, value: Any) -> str | None:
        if value is None:
            return value
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2026-12-03 as a date
            return value.isoformat()
        try:
            return datetime.date.fromisoformat(str(value)).isoformat()
        except ValueError:
            raise ValueError(f"expected a date as YYYY-MM-DD, got {value!r}") from None


class GenerateConfig(Section):
    """Evaluation by generation: answer held-out prompts and score them."""

    num_samples: int = Field(64, ge=1, description="held-out prompts answered per evaluation")
    max_new_tokens: int = Field(16, ge=1, description="longest answer generated")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy; above 0 samples (seeded)")
    batch_size: int = Field(32, ge=1, description="prompts generated at once (left-padded)")
    keep_samples: int = Field(4, ge=0, description="prompt / completion / reference triples "
                              "written to samples.jsonl per evaluation")


class EvalConfig(Section):
    """What an evaluation does besides the eval loss."""

    generate: GenerateConfig | None = Field(
        None, description="also generate answers and log eval/exact_match (task: sft); "
        "null = off")


class ReportConfig(Section):
    """The report written into ``RUN_DIR/report/`` when ``gearshift train`` ends."""

    enabled: bool = Field(True, description="write RUN_DIR/report/ (plots + summary.md) when "
                          "`gearshift train` or `gearshift resume` ends")


class DaemonConfig(Section):
    """The training daemon (``gearshift daemon``): inbox watching, snapshots, status."""

    settle_seconds: float = Field(2.0, ge=0.0, description="an inbox file is taken only once "
                                  "its size and mtime have not changed for this long")
    poll_seconds: float = Field(1.0, gt=0.0, description="how often the inbox is scanned "
                                "(besides the watchdog events, and alone where none arrive)")
    watch: bool = Field(True, description="use the watchdog package for inbox events (the "
                        "polling fallback always runs)")
    keep_snapshots: int = Field(5, ge=1, description="snapshots kept (newest); the current "
                                "model's and any adapter base still used are always kept")
    status_every_seconds: float = Field(5.0, gt=0.0, description="rewrite "
                                        "status/training_status.json at least this often")
    min_examples: int = Field(2, ge=1, description="a file with fewer usable examples goes to "
                              "failed/")
    max_memory_mb: float | None = Field(None, gt=0, description="when a step's peak memory "
                                        "exceeds this, halve the micro-batch for the next steps "
                                        "(as after an out-of-memory error); null = no limit")
    model_name: str | None = Field(None, description="{model_name} of the profile and the "
                                   "status's model_display_name; null = the initial model's "
                                   "directory name")
    stage_delay_s: dict[str, float] = Field(
        default_factory=dict, description="fault drill: sleep this long at a stage (train_end, "
        "snapshot_file, switch, done) so that a kill can land there; empty = off")

    @field_validator("stage_delay_s")
    @classmethod
    def _known_stages(cls, value: dict[str, float]) -> dict[str, float]:
        stages = ("train_end", "snapshot_file", "switch", "done")
        for name, seconds in value.items():
            if name not in stages:
                raise ValueError(f"unknown stage {name!r}; valid stages: {', '.join(stages)}")
            if not (math.isfinite(seconds) and seconds >= 0):
                raise ValueError(f"{name}: the delay must be >= 0 seconds, got {seconds}")
        return value


class FsdpConfig(Section):
    """Fully sharded data parallel (FSDP2 through Accelerate): what is sharded and how."""

    reshard_after_forward: bool = Field(
        True, description="free each block's gathered weights after its forward (FULL_SHARD, "
        "least memory); false keeps them until backward (SHARD_GRAD_OP, less communication)")
    wrap: list[str] | None = Field(
        None, description="transformer block class names sharded as units, e.g. "
        "[LlamaDecoderLayer]; null = the model's own _no_split_modules")
    cpu_offload: bool = Field(False, description="keep parameters and optimizer state in CPU "
                              "memory between uses (GPU only)")
    activation_checkpointing: bool = Field(
        False, description="recompute each wrapped block's activations in backward (FSDP's "
        "own activation checkpointing)")


class DistributedConfig(Section):
    """How several processes share the work (launch them with `gearshift launch`)."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp = every process holds the whole model and gradients are "
        "averaged; fsdp = parameters, gradients and optimizer state are sharded over the "
        "processes (checkpoints sharded too). DeepSpeed: an Accelerate config file")
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)


class Config(Section):
    """The whole run configuration.

    Top-level keys other than the fields below are the sections of registered tasks
    (``config.<task name>``); validation rejects any other unknown key.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    task: str = Field("lm", min_length=1, description="what the run trains: a name in "
                      "gearshift.tasks.TASKS (lm = causal language modelling)")
    name: str = Field("default", min_length=1, description="run name (prefix of the run dir)")
    seed: int = Field(1234, ge=0, description="seeds weights, data order and every RNG")
    output_dir: str = Field("runs", description="parent of run directories")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    phases: dict[str, Any] | None = Field(
        None, description="the phase controller (gearshift's schema or the LoRA-trainer "
        "schema); see the README section 'Adaptive phases'")
    resume: str | None = Field(None, description="RUN_DIR or 'auto' to continue a run")
