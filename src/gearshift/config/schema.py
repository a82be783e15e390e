"""The typed configuration schema (pydantic v2).

Every section forbids unknown keys so that a typo is an error with a did-you-mean, never a
silently ignored setting. Defaults are the embedded default recipe: a small byte-level
Llama-architecture model trained on the Python reference manual that ships with CPython.
"""

from __future__ import annotations

import math
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
        None, description="local Hugging Face model directory; when null the model is built"
    )
    build: ModelBuild = Field(default_factory=ModelBuild)
    tokenizer: Literal["auto", "byte"] = Field(
        "auto",
        description="'byte' = built-in byte-level tokenizer (no files); "
        "'auto' = from model.path when set, else byte",
    )


class DataConfig(Section):
    """Training text: the built-in corpus, plain-text files or JSONL files."""

    source: Literal["pydoc_topics", "text", "jsonl"] = Field(
        "pydoc_topics",
        description="pydoc_topics = the Python reference manual shipped with CPython",
    )
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
    """When to checkpoint and how many to keep."""

    enabled: bool = Field(True, description="write checkpoints at all")
    every: int = Field(100, ge=1, description="checkpoint every N optimizer steps")
    keep_last: int = Field(3, ge=1, description="checkpoints kept on disk (newest)")
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


class ReportConfig(Section):
    """The report written into ``RUN_DIR/report/`` when ``gearshift train`` ends."""

    enabled: bool = Field(True, description="write RUN_DIR/report/ (plots + summary.md) when "
                          "`gearshift train` or `gearshift resume` ends")


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
    report: ReportConfig = Field(default_factory=ReportConfig)
    phases: dict[str, Any] | None = Field(
        None, description="the phase controller (gearshift's schema or the LoRA-trainer "
        "schema); see the README section 'Adaptive phases'")
    resume: str | None = Field(None, description="RUN_DIR or 'auto' to continue a run")
