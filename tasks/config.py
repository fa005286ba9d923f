"""The one config tree: pydantic models loaded once from YAML plus ``--set`` overrides.

Every stage receives its own slice (``DataConfig``, ``TrainConfig``...), never a dict. A typo or a
bad value fails here, before any work starts, with one line naming the key (and, for a typo, the
nearest valid key).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from forgeline.tasks.config_file import line_of_key, parse_yaml, read_config_text
from forgeline.tasks.errors import ConfigError as ConfigError  # raised by load_config; kept importable from here

SECRET_MARKERS = ("token", "password", "secret", "apikey", "api_key", "private_key")


MAX_SEED = 2**31 - 1
"""Largest ``seed``: torch takes 64 bits, but Optuna's samplers (numpy) stop at 2^32 and the tuner adds
``1000 * worker + trials`` to the seed, so a signed 32-bit seed leaves room for every offset."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------- task
TaskKind = Literal["lm", "classification", "completion"]


class TaskConfig(_Strict):
    """What the model learns to do; every stage picks its behaviour from ``kind``."""

    kind: TaskKind = Field(
        "lm",
        description="lm: a causal language model (bits per byte); classification: text -> label (F1, accuracy); "
        "completion: prompt -> completion (BLEU, ROUGE, exact match).",
    )


# The champion gate's metric, the search's metric and the loop's defaults, per task kind.
GATE_METRIC: dict[str, str] = {
    "lm": "test/bits_per_byte",
    "classification": "test/f1_macro",
    "completion": "test/rougeL",
}
TUNE_METRIC: dict[str, str] = {"lm": "val/loss", "classification": "val/f1_macro", "completion": "val/loss"}
DEFAULT_PATIENCE: dict[str, int | None] = {"lm": None, "classification": 3, "completion": 3}
_HIGHER_IS_BETTER_WORDS = ("accuracy", "f1", "precision", "recall", "bleu", "rouge", "chrf", "exact_match")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better (F1, accuracy, BLEU, ROUGE...) or worse (loss, bits)."""
    leaf = metric.lower().rsplit("/", 1)[-1]
    return any(word in leaf for word in _HIGHER_IS_BETTER_WORDS)


# --------------------------------------------------------------------------------------------- data
class _Columns(_Strict):
    """Column options shared by the table and dataset sources (JSON keys, CSV headers, Arrow fields)."""

    text_column: str = Field("text", description="Column (or JSON key) holding the text in table files.")


class FilesSource(_Columns):
    """Local files or globs: ``.txt``, ``.jsonl``/``.json``, ``.csv``, ``.parquet``."""

    kind: Literal["files"] = "files"
    paths: list[str] = Field(min_length=1, description="Files or glob patterns, relative to the working directory.")


class DirectorySource(_Columns):
    """Every supported file under a directory (recursively)."""

    kind: Literal["directory"] = "directory"
    path: str = Field(description="Directory to read.")
    pattern: str = Field("**/*", description="Glob of files to take inside the directory.")


class HfSource(_Columns):
    """A Hugging Face dataset: a ``save_to_disk`` folder, or a hub id (online, or in the local HF cache)."""

    kind: Literal["hf"] = "hf"
    name: str = Field(description="A folder written by datasets' save_to_disk, or a hub id such as 'user/corpus'.")
    config: str | None = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Which split of the dataset to read.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")


class BuiltinSource(_Strict):
    """An offline corpus that exists on any machine with Python (the standard library's docs)."""

    kind: Literal["builtin"] = "builtin"
    name: Literal["python-docs", "python-docstrings"] = Field(
        "python-docs",
        description="Which built-in corpus. python-docs: the standard library's docs as text (lm); "
        "python-docstrings: signature -> first docstring sentence pairs (completion).",
    )
    max_bytes: int = Field(2_000_000, gt=0, description="Stop reading the corpus after this many bytes.")


Source = Annotated[FilesSource | DirectorySource | HfSource | BuiltinSource, Field(discriminator="kind")]


class SplitFractions(_Strict):
    """Fractions of the data that go to each split; they must add up to 1."""

    train: float = Field(0.9, gt=0, le=1)
    validation: float = Field(0.05, gt=0, lt=1)
    test: float = Field(0.05, ge=0, lt=1, description="0 means: evaluate on the validation split.")

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitFractions:
        total = self.train + self.validation + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"split fractions must add up to 1, got {total:g}")
        return self


class CleaningConfig(_Strict):
    """Cleaning rules; each is counted in the cleaning report."""

    unicode_form: Literal["NFC", "NFKC", "none"] = Field("NFC", description="Unicode normalization form.")
    normalize_whitespace: bool = Field(
        True, description="CRLF to LF, strip trailing spaces, tabs to spaces, collapse runs of blank lines."
    )
    strip_control: bool = Field(True, description="Drop control characters other than newline and tab.")
    dedup: bool = Field(True, description="Drop exact duplicate records (by content hash).")
    near_dedup: bool = Field(False, description="Drop near-duplicate records (MinHash), if datasketch is installed.")
    near_dedup_threshold: float = Field(0.9, gt=0, le=1, description="Jaccard similarity treated as duplicate.")
    min_chars: int = Field(1, ge=0, description="Drop records shorter than this (after normalization).")
    max_chars: int | None = Field(None, gt=0, description="Drop records longer than this; null for no limit.")
    max_nontext_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Drop records whose share of non-letter, non-space characters exceeds this.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> CleaningConfig:
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) < min_chars ({self.min_chars})")
        return self


class DataConfig(_Strict):
    """Where the text comes from, how it is cut into records, cleaned and split."""

    sources: list[Source] = Field(default_factory=lambda: [BuiltinSource()], min_length=1)
    record: Literal["line", "paragraph", "file"] = Field(
        "paragraph", description="For plain text: one record per line, per blank-line paragraph, or per file."
    )
    split: Literal["hash", "tail"] = Field(
        "hash",
        description="hash: each record's split fixed by its content hash; tail: contiguous fractions of one stream.",
    )
    fractions: SplitFractions = Field(default_factory=SplitFractions)
    cleaning: CleaningConfig = Field(default_factory=CleaningConfig)
    cache_dir: str = Field("mlruns/cache", description="Content-addressed store of cleaned datasets.")
    roots: list[str] = Field(
        default_factory=list,
        description="Directories data may be read from; empty: the working directory and each source's folder.",
    )
    text_columns: list[str] = Field(
        default_factory=list,
        description="Columns joined with a newline into the text (instead of each source's text_column).",
    )
    label_column: str | None = Field(None, description="Column carried into the splits as 'label' (classification).")
    prompt_column: str | None = Field(None, description="Column carried into the splits as 'prompt' (completion).")
    completion_column: str | None = Field(
        None, description="Column carried into the splits as 'completion' (completion)."
    )
    num_proc: int | None = Field(
        None, ge=1, description="Worker processes for cleaning; null: the machine's cores (one for small inputs)."
    )
    prompt_overflow: Literal["drop", "truncate_left"] = Field(
        "drop",
        description="completion: a prompt that leaves no room for its completion in model.block_size is dropped "
        "(counted in the report) or cut from the left.",
    )


# ---------------------------------------------------------------------------------------- tokenizer
class TokenizerConfig(_Strict):
    """How text becomes token ids."""

    kind: Literal["char", "bpe", "pretrained"] = Field("char", description="char, byte-level bpe, or pretrained.")
    vocab_size: int = Field(2048, ge=260, le=1_000_000, description="Vocabulary size for bpe.")
    source: str | None = Field(None, description="Local directory or hub id, for kind=pretrained.")

    @model_validator(mode="after")
    def _source_for_pretrained(self) -> TokenizerConfig:
        if self.kind == "pretrained" and not self.source:
            raise ValueError("tokenizer.source is required when tokenizer.kind is 'pretrained'")
        return self


# -------------------------------------------------------------------------------------------- model
class ModelConfig(_Strict):
    """A GPT-2 family causal LM, built from these sizes or initialised from ``init_from``."""

    family: Literal["gpt2"] = Field("gpt2", description="Model family.")
    n_layer: int = Field(4, ge=1, le=128)
    n_head: int = Field(4, ge=1, le=128)
    n_embd: int = Field(128, ge=1, le=16384)
    block_size: int = Field(64, ge=2, le=32768, description="Context length in tokens.")
    dropout: float = Field(0.0, ge=0, lt=1)
    bias: bool = Field(
        True,
        description="Biases in linear layers and layer norms, as GPT-2. false: none (held at zero, not trained), "
        "as nanoGPT's default: a little better and faster. Models built from sizes only.",
    )
    activation: Literal["gelu_new", "gelu"] = Field(
        "gelu_new",
        description="MLP activation. gelu_new: GPT-2's tanh approximation (run as one fused PyTorch op); "
        "gelu: the exact GELU, as nanoGPT. Models built from sizes only.",
    )
    init_from: str | None = Field(
        None, description="Local directory, hub id, or registered model URI (models:/NAME@champion)."
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        return self


# -------------------------------------------------------------------------------------------- train
class TrainConfig(_Strict):
    """The training loop (nanoGPT-style: random windows, warm-up then cosine decay)."""

    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(12, ge=1, description="Sequences per micro-batch.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(1e-3, gt=0, le=10)
    min_lr: float = Field(1e-4, ge=0, description="Floor of the cosine decay.")
    warmup_steps: int = Field(100, ge=0)
    lr_decay_steps: int | None = Field(None, ge=1, description="Steps of cosine decay; null means max_steps.")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.99, gt=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm; 0 disables clipping.")
    eval_interval: int = Field(100, ge=1, description="Evaluate on fixed validation batches every N steps.")
    eval_batches: int = Field(20, ge=1, description="Validation batches per evaluation.")
    log_interval: int = Field(10, ge=1, description="Log train metrics every N steps.")
    checkpoint_interval: int = Field(100, ge=1, description="Write a checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Complete checkpoints kept on disk.")
    epochs: float | None = Field(
        None,
        gt=0,
        description="classification, completion: passes over the shuffled training split (sets the steps; "
        "max_steps then caps them). null: max_steps alone.",
    )
    patience: int | None = Field(
        None,
        ge=0,
        validation_alias=AliasChoices("patience", "early_stopping_patience"),
        description="Stop after N evaluations without validation improvement; 0: never. null: the task's "
        "default (off for lm, 3 for classification and completion). Old name: early_stopping_patience.",
    )
    keep_best: bool | None = Field(
        None,
        description="Evaluate and register the weights of the best validation evaluation, not the last. "
        "null: the task's default (false for lm, true for classification and completion).",
    )
    class_weights: Literal["none", "balanced"] = Field(
        "none", description="classification: weigh the loss by inverse class frequency (balanced) or not."
    )
    loss_on: Literal["completion", "all"] | None = Field(
        None, description="completion: which tokens the loss counts. null: completion."
    )
    max_nonfinite_steps: int = Field(
        3, ge=1, description="A non-finite loss skips the step; this many in a row fails the run."
    )
    compile: bool = Field(False, description="torch.compile the model's forward and loss as one function.")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        "default",
        description="torch.compile mode when compile is on: reduce-overhead replays CUDA graphs (GPU), "
        "max-autotune also searches kernels (longer compile).",
    )
    cpu_shards: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="lm training on a CPU: each batch is cut into this many shards that run forward and backward "
        "at once, one thread each with its share of the cores; gradients are summed, so what is learned is the "
        "same. auto: 2 with at least 2 intra-op threads; none under torch.compile or torchrun or with dropout. 1: off "
        "(docs/operations.md section 7).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bf16 autocast on CUDA.")
    checkpoint_dir: str = Field("mlruns/checkpoints", description="Where checkpoints live.")
    nproc_per_node: int | Literal["auto"] = Field(
        1,
        description="Training processes on this machine; above 1 (in all) training runs under torchrun with "
        "DistributedDataParallel. auto: one per visible GPU (1 without CUDA).",
    )
    nnodes: int = Field(1, ge=1, description="Machines in the torchrun job (see docs/operations.md).")
    rdzv_endpoint: str | None = Field(
        None, description="host:port of the c10d rendezvous when nnodes > 1; null: a single machine."
    )
    dist_timeout_s: float = Field(
        300.0, gt=0, description="Seconds a rank waits in a collective for a dead or stuck peer before failing."
    )

    @model_validator(mode="after")
    def _lr_order(self) -> TrainConfig:
        if self.min_lr > self.learning_rate:
            raise ValueError(f"train.min_lr ({self.min_lr}) > train.learning_rate ({self.learning_rate})")
        if isinstance(self.nproc_per_node, int) and self.nproc_per_node < 1:
            raise ValueError(f"train.nproc_per_node must be >= 1 or 'auto', not {self.nproc_per_node}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("train.nnodes > 1 needs train.rdzv_endpoint (host:port of the rendezvous)")
        return self


# --------------------------------------------------------------------------------------------- eval
class EvalConfig(_Strict):
    """Held-out evaluation and sample generations."""

    prompts: list[str] = Field(default_factory=lambda: ["\n"], description="Fixed prompts for sample generations.")
    max_new_tokens: int = Field(100, ge=1, le=4096)
    temperature: float = Field(0.8, gt=0)
    top_k: int | None = Field(50, ge=1)
    max_tokens: int = Field(200_000, ge=1, description="Cap on test tokens scored.")
    do_sample: bool = Field(
        False, description="completion: sample (seeded, with temperature and top_k) instead of greedy decoding."
    )
    stop_at: Literal["eos", "newline"] = Field(
        "newline", description="completion: decoding stops at end-of-text, or also at the first newline."
    )
    max_examples: int | None = Field(
        None, ge=1, description="classification, completion: score at most this many test records; null: all."
    )


# --------------------------------------------------------------------------------------------- tune
class FloatParam(_Strict):
    type: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _order(self) -> FloatParam:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log scale needs low > 0")
        return self


class IntParam(_Strict):
    type: Literal["int"] = "int"
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _order(self) -> IntParam:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) > high ({self.high})")
        return self


class CategoricalParam(_Strict):
    type: Literal["categorical"] = "categorical"
    choices: list[Any] = Field(min_length=1)


SearchParam = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class TuneConfig(_Strict):
    """Optuna search; ``n_trials: 0`` skips the stage."""

    n_trials: int = Field(0, ge=0, description="Completed trials wanted; 0 disables tuning.")
    timeout: float | None = Field(None, gt=0, description="Seconds for the whole search.")
    parallelism: int = Field(1, ge=1, description="Trials at once, as separate processes.")
    sampler: Literal["tpe", "random", "cmaes"] = "tpe"
    pruner: Literal["median", "hyperband", "successive_halving", "none"] = "median"
    max_steps: int | None = Field(None, ge=1, description="Training steps per trial; null means train.max_steps.")
    storage: str | None = Field(
        None, description="SQLAlchemy URL; null means $FORGELINE_TUNE_STORAGE, else sqlite under mlruns/."
    )
    search_space: dict[str, SearchParam] = Field(default_factory=dict, description="Dotted config key -> range.")
    eval_interval: int | None = Field(
        None, ge=1, description="Evaluate (and report to the pruner) every N steps in trials; null: train's."
    )
    startup_trials: int = Field(2, ge=0, description="Trials that always run in full before the pruner may stop one.")
    heartbeat_interval: int = Field(30, ge=1, description="Seconds between a running trial's heartbeats.")
    grace_period: int | None = Field(
        None, ge=1, description="Seconds without a heartbeat before a RUNNING trial counts as crashed; null: 2x."
    )
    max_retries: int = Field(1, ge=0, description="Times a crashed trial is retried with the same parameters.")
    metric: str | None = Field(
        None,
        description="Validation metric the pruner and the best trial use (val/loss; classification also "
        "val/f1_macro, val/accuracy); null: the task's (val/loss for lm and completion, val/f1_macro for "
        "classification). Completion may also choose by a generation metric on the validation split "
        "(val/rougeL, val/rouge1, val/rouge2, val/bleu, val/exact_match, val/chrf): the pruner still uses the "
        "validation loss, and each finished trial's model decodes the validation split for its value.",
    )

    @field_validator("search_space")
    @classmethod
    def _known_keys(cls, space: dict[str, Any]) -> dict[str, Any]:
        valid = _leaf_keys(PipelineConfig)
        for key in space:
            if key not in valid or key.startswith(("tune.", "registry.", "tracking.", "data.", "name", "seed")):
                raise ValueError(f"unknown search_space key {key!r}{_suggest(key, valid)}")
        return space

    @field_validator("search_space")
    @classmethod
    def _values_fit_their_keys(cls, space: dict[str, Any]) -> dict[str, Any]:
        # A choice the key cannot take failed only at trial time, after cleaning; check each one now.
        for key, param in space.items():
            adapter = _field_adapter(key)
            if adapter is None:
                continue
            if isinstance(param, CategoricalParam):
                values = [("choice", v) for v in param.choices]
            else:
                values = [("low", param.low), ("high", param.high)]
                if isinstance(param, FloatParam) and param.low < param.high:
                    values.append(("a value between low and high", (param.low + param.high) / 2))
            for what, value in values:
                try:
                    adapter.validate_python(value)
                except ValidationError as exc:
                    msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"{key}: {what} {value!r} does not fit: {msg}") from None
        return space

    @model_validator(mode="after")
    def _space_when_enabled(self) -> TuneConfig:
        if self.n_trials > 0 and not self.search_space:
            raise ValueError("tune.n_trials > 0 needs a tune.search_space (dotted key -> range)")
        return self


# ----------------------------------------------------------------------------------------- compress
class CompressConfig(_Strict):
    """Distil (or prune) a registered teacher into a smaller student, registered as its own model."""

    enabled: bool = Field(False, description="Run the compress stage after register in `forgeline run`.")
    method: Literal["distill", "prune"] = Field(
        "distill",
        description="distill: copy the chosen teacher layers (default: half of them, evenly spaced) and distil; "
        "prune: keep the layers, shrink the MLP width by weight magnitude, then a distilled recovery fine-tune.",
    )
    init: Literal["teacher", "scratch"] = Field(
        "teacher", description="teacher: copy embeddings, final norm, head and layers; scratch: random weights."
    )
    layers_from_teacher: list[int] | None = Field(
        None, description="Teacher layers copied into the student, in order (DistilGPT2: [0, 2, 4, 7, 9, 11])."
    )
    n_layer: int | None = Field(None, ge=1, le=128, description="Student layers; null: from layers_from_teacher.")
    n_embd: int | None = Field(None, ge=1, le=16384, description="Student width; null: the teacher's.")
    n_head: int | None = Field(None, ge=1, le=128, description="Student heads; null: the teacher's.")
    n_inner: int | None = Field(
        None, ge=1, description="Student MLP width; null: the teacher's (prune: half of it), kept by magnitude."
    )
    student_from: str | None = Field(
        None, description="Start from this saved model (folder or models:/ URI) instead of the teacher's layers."
    )
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the distillation loss.")
    alpha_kd: float = Field(0.5, ge=0, description="Weight of T^2 * KL(teacher || student) on softened logits.")
    alpha_ce: float = Field(0.5, ge=0, description="Weight of the next-token cross-entropy on the data.")
    max_steps: int = Field(200, ge=1, description="Distillation (or recovery fine-tune) steps.")
    learning_rate: float | None = Field(None, gt=0, le=10, description="null: train.learning_rate.")
    model_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$",
        description="Registered name of the student; null: <registry.model_name>-small.",
    )
    max_quality_drop: float = Field(
        0.1,
        ge=0,
        description="The student becomes champion of its model only if its metric is at most this much worse "
        "than the teacher's, relative (0.1: bits per byte up to 10% higher; a classifier's macro F1 up to 10% lower).",
    )
    latency_requests: int = Field(20, ge=1, description="Generate calls timed for the latency p50/p95.")
    latency_new_tokens: int = Field(32, ge=1, description="Tokens generated per timed call (batch 1, KV cache).")

    @model_validator(mode="after")
    def _consistent_student(self) -> CompressConfig:
        layers = self.layers_from_teacher
        if layers is not None:
            if not layers:
                raise ValueError("compress.layers_from_teacher must name at least one layer")
            if len(set(layers)) != len(layers) or any(i < 0 for i in layers):
                raise ValueError(f"compress.layers_from_teacher must be distinct indexes >= 0, got {layers}")
            if self.n_layer is not None and self.n_layer != len(layers):
                raise ValueError(
                    f"compress.n_layer ({self.n_layer}) differs from len(compress.layers_from_teacher) ({len(layers)})"
                )
        if self.alpha_kd == 0 and self.alpha_ce == 0:
            raise ValueError("compress.alpha_kd and compress.alpha_ce are both 0: nothing to train on")
        return self


# ------------------------------------------------------------------------------------------ registry
class RegistryConfig(_Strict):
    """MLflow model registry and the champion gate."""

    model_name: str = Field("forgeline-lm", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    min_improvement: float = Field(
        0.0, ge=0, description="Candidate's gate metric must beat the champion's by at least this."
    )
    metric: str | None = Field(
        None,
        description="The champion gate's metric; null: the task's (test/bits_per_byte for lm, test/f1_macro for "
        "classification, test/rougeL for completion).",
    )
    higher_is_better: bool | None = Field(
        None, description="Direction of registry.metric; null: from its name (loss, bits: lower; F1, ROUGE: higher)."
    )
    champion_alias: str = Field("champion", pattern=r"^[a-z][a-z0-9_\-]*$")
    challenger_alias: str = Field("challenger", pattern=r"^[a-z][a-z0-9_\-]*$")


class TrackingConfig(_Strict):
    """Where MLflow lives. Null ``uri`` means ``$MLFLOW_TRACKING_URI`` or SQLite under ``mlruns/``."""

    uri: str | None = None
    artifact_root: str = Field("mlruns/artifacts", description="Artifact folder for the embedded SQLite store.")
    log_system_metrics: bool = Field(True, description="CPU, memory (and GPU) metrics on the train run.")
    metric_flush_interval: int = Field(
        250,
        ge=1,
        description="Per-step metrics are sent in one batch every N steps (and at the end). MLflow's SQLite "
        "store spends about 65 us of CPU per metric plus 5 ms per batch: 250 keeps tracking under 1% of a step.",
    )


class WorkPoolConfig(_Strict):
    """A Prefect work pool that ``forgeline deploy`` creates (or updates) idempotently."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", description="Work pool name.")
    type: str = Field("process", min_length=1, description="Worker type: process, docker, kubernetes...")
    job_variables: dict[str, Any] = Field(
        default_factory=dict,
        description="Defaults for the pool's base job template, e.g. {env: {CUDA_VISIBLE_DEVICES: '0'}}.",
    )
    concurrency_limit: int | None = Field(None, ge=1, description="Flow runs at once on the pool; null: no limit.")
    require_cuda: bool = Field(False, description="Flow runs on this pool fail fast when CUDA is missing.")


class DeployConfig(_Strict):
    """Deployed mode: work pools and deployments (``forgeline deploy``) and GPU pinning."""

    cpu_pool: WorkPoolConfig = Field(default_factory=lambda: WorkPoolConfig(name="cpu"))
    gpu_pool: WorkPoolConfig = Field(
        default_factory=lambda: WorkPoolConfig(name="gpu", concurrency_limit=1, require_cuda=True)
    )
    allow_cpu_fallback: bool = Field(
        False, description="Let GPU-pool flow runs train on CPU when CUDA is missing (tests, laptops)."
    )
    train_timeout: float | None = Field(
        None, gt=0, description="Seconds the pipeline waits for a deployed tune or train run; null: no limit."
    )
    gpu_start_timeout: float = Field(
        300,
        gt=0,
        description=(
            "Seconds a deployed tune or train run may stay Scheduled/Late while its pool has no live worker; "
            "then it is cancelled and the pipeline fails."
        ),
    )
    heartbeat_seconds: int = Field(
        30, ge=30, description="Seconds between a deployed flow run's heartbeats (Prefect's minimum is 30)."
    )
    missed_heartbeats: int = Field(
        3, ge=2, description="A deployed flow run silent for this many heartbeats is marked Crashed."
    )
    incoming_dir: str = Field(
        "data/incoming", description="Where `forgeline ingest` puts new data files (content-addressed)."
    )
    retrain_from: Literal["champion", "scratch"] = Field(
        "champion", description="A retrain fine-tunes the current champion, or trains from scratch."
    )
    retrain_cron: str | None = Field(
        "0 3 * * 1", description="Cron schedule of the retrain deployment; null: no schedule."
    )
    retrain_schedule_active: bool = Field(
        False, description="Whether the retrain schedule starts active (switch it on in the Prefect UI)."
    )
    drop_dir: str = Field(
        "data/drop", description="Folder the `watch` deployment scans for data files dropped by other means."
    )
    watch_interval: float | None = Field(
        60,
        ge=1,
        description=(
            "Seconds between the looks of the watcher (the one long-lived flow run of the `watch` deployment "
            "that `forgeline deploy` starts); null: no watcher."
        ),
    )
    watch_settle: float = Field(
        2.0, ge=0, description="Seconds between the watch's two looks at a file; a file that changed is left alone."
    )

    @model_validator(mode="after")
    def _watcher_leaves_a_cpu_slot(self) -> DeployConfig:
        # The watcher's run holds a cpu-pool slot for good: with a limit of 1 no pipeline would ever start.
        limit = self.cpu_pool.concurrency_limit
        if self.watch_interval and limit is not None and limit < 2:
            raise ValueError(
                f"deploy.cpu_pool.concurrency_limit {limit} leaves no slot beside the watcher's long-lived run: "
                "set it to 2 or more, or deploy.watch_interval: null"
            )
        return self

    @field_validator("cpu_pool", "gpu_pool", mode="before")
    @classmethod
    def _pool_defaults(cls, value: Any, info: Any) -> Any:
        # A partial pool section (say, only job_variables) keeps that pool's default name and limits.
        if isinstance(value, dict):
            defaults = (
                {"name": "gpu", "concurrency_limit": 1, "require_cuda": True}
                if info.field_name == "gpu_pool"
                else {"name": "cpu"}
            )
            return {**defaults, **value}
        return value


class PipelineConfig(_Strict):
    """The whole pipeline: one tree, validated once."""

    name: str = Field("forgeline-demo", min_length=1, description="Experiment name.", pattern=r"^[\w.\- ]+$")
    seed: int = Field(
        1337,
        ge=0,
        le=MAX_SEED,
        description="Random seed (the tuner adds trial offsets to it; Optuna's samplers take < 2^32).",
    )
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)

    @model_validator(mode="after")
    def _keys_fit_the_task(self) -> PipelineConfig:
        for key, problem in _task_conflicts(self):
            raise ValueError(f"{key}: {problem}")
        return self

    @property
    def kind(self) -> str:
        """The task kind (``lm``, ``classification`` or ``completion``)."""
        return self.task.kind

    def gate_metric(self) -> tuple[str, bool]:
        """The champion gate's metric and whether higher is better (``registry.*`` or the task's default)."""
        metric = self.registry.metric or GATE_METRIC[self.kind]
        higher = self.registry.higher_is_better
        return metric, higher_is_better(metric) if higher is None else higher

    def tune_metric(self) -> tuple[str, bool]:
        """The validation metric the search optimizes and whether higher is better."""
        metric = self.tune.metric or TUNE_METRIC[self.kind]
        return metric, higher_is_better(metric)

    def patience(self) -> int | None:
        """Evaluations without improvement before training stops; ``None``: never."""
        value = self.train.patience if self.train.patience is not None else DEFAULT_PATIENCE[self.kind]
        return value or None

    def keep_best(self) -> bool:
        """Whether the best validation evaluation's weights (not the last) are the trained model."""
        return self.train.keep_best if self.train.keep_best is not None else self.kind != "lm"

    def for_flow_run(self) -> PipelineConfig:
        """This config as a Prefect flow-run or deployment parameter, with the secrets under ``deploy`` masked.

        The Prefect server stores parameters and shows them in its UI. The ``deploy`` section's job
        variables (tokens, passwords for the workers' environment) are read only by ``forgeline deploy``
        when it creates the pools, never by a flow run, so they travel as ``***``.
        """
        tree = self.model_dump(mode="json")
        tree["deploy"] = redact(tree["deploy"])
        return type(self).model_validate(tree)

    def config_hash(self) -> str:
        """Hash of what determines the trained weights (not tracking, registry or tune settings)."""
        payload = self.model_dump(mode="json", include={"seed", "task", "tokenizer", "model", "train", "data"})
        # train.patience was train.early_stopping_patience: the old name keeps old hashes.
        payload["train"]["early_stopping_patience"] = payload["train"].pop("patience")
        for section, keys in _UNHASHED_KEYS.items():  # where and how wide it runs, not what it learns
            for key in keys:
                payload[section].pop(key, None)
        # Keys added after configs were in use count only when set away from their default, so a config
        # that does not use them keeps its hash (and its checkpoints resume after an upgrade).
        for section, defaults in _LATER_KEYS.items():
            for key, default in defaults.items():
                if payload[section].get(key) == default:
                    payload[section].pop(key)
        if not payload["task"]:
            del payload["task"]
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


_LATER_KEYS: dict[str, dict[str, Any]] = {
    "task": {"kind": "lm"},
    "model": {"bias": True, "activation": "gelu_new"},
    "train": {"epochs": None, "keep_best": None, "class_weights": "none", "loss_on": None},
    "data": {
        "text_columns": [],
        "label_column": None,
        "prompt_column": None,
        "completion_column": None,
        "prompt_overflow": "drop",
    },
}
# Never hashed: a checkpoint resumes under any world size (the global batch then changes with it), compile mode or
# number of CPU shards.
_UNHASHED_KEYS: dict[str, tuple[str, ...]] = {
    "train": (
        "checkpoint_dir",
        "nproc_per_node",
        "nnodes",
        "rdzv_endpoint",
        "dist_timeout_s",
        "compile_mode",
        "cpu_shards",
    ),
    "data": ("cache_dir", "num_proc"),
}


_CLASSIFICATION_VAL_METRICS = ("val/f1_macro", "val/accuracy", "val/loss")
COMPLETION_TUNE_METRICS = (
    "val/loss",
    "val/rougeL",
    "val/rouge1",
    "val/rouge2",
    "val/bleu",
    "val/exact_match",
    "val/chrf",
)
"""What a completion search may choose by: the validation loss, or a generation metric on the validation split."""


def _task_conflicts(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """Keys set to something the chosen ``task.kind`` cannot use, each with the reason (empty: none)."""
    kind, data, train = cfg.kind, cfg.data, cfg.train
    conflicts: list[tuple[str, str]] = []
    if kind == "classification" and not data.label_column:
        conflicts.append(("data.label_column", "task.kind 'classification' needs the column holding the labels"))
    if kind == "classification" and data.split == "tail":
        conflicts.append(("data.split", "'tail' joins all records into one text: classification needs 'hash'"))
    if kind != "classification":
        if data.label_column:
            conflicts.append(("data.label_column", f"only for task.kind 'classification', not {kind!r}"))
        if train.class_weights != "none":
            conflicts.append(("train.class_weights", f"only for task.kind 'classification', not {kind!r}"))
    if kind == "completion" and data.split == "tail":
        conflicts.append(("data.split", "'tail' joins all records into one text: completion needs 'hash'"))
    if kind == "completion":
        builtin = any(getattr(s, "name", None) == "python-docstrings" for s in data.sources)
        if not builtin and not (data.prompt_column and data.completion_column):
            conflicts.append(
                ("data.prompt_column", "task.kind 'completion' needs data.prompt_column and data.completion_column")
            )
    else:
        for key in ("prompt_column", "completion_column"):
            if getattr(data, key):
                conflicts.append((f"data.{key}", f"only for task.kind 'completion', not {kind!r}"))
        if train.loss_on is not None:
            conflicts.append(("train.loss_on", f"only for task.kind 'completion', not {kind!r}"))
        if any(getattr(s, "name", None) == "python-docstrings" for s in data.sources):
            conflicts.append(("data.sources", "the builtin 'python-docstrings' corpus is for task.kind 'completion'"))
    if kind == "classification":
        if train.nnodes > 1 or (isinstance(train.nproc_per_node, int) and train.nproc_per_node > 1):
            conflicts.append(("train.nproc_per_node", "task.kind 'classification' trains in one process"))
        if cfg.tune.metric and cfg.tune.metric not in _CLASSIFICATION_VAL_METRICS:
            allowed = ", ".join(_CLASSIFICATION_VAL_METRICS)
            conflicts.append(("tune.metric", f"task.kind 'classification' logs {allowed}, not {cfg.tune.metric!r}"))
    if kind == "completion":
        if train.nnodes > 1 or (isinstance(train.nproc_per_node, int) and train.nproc_per_node > 1):
            conflicts.append(("train.nproc_per_node", "task.kind 'completion' trains in one process"))
        if cfg.tune.metric and cfg.tune.metric not in COMPLETION_TUNE_METRICS:
            allowed = ", ".join(COMPLETION_TUNE_METRICS)
            conflicts.append(("tune.metric", f"task.kind 'completion' searches on {allowed}, not {cfg.tune.metric!r}"))
    if kind == "lm" and train.epochs is not None:
        conflicts.append(("train.epochs", "task.kind 'lm' trains on random windows: use train.max_steps"))
    return conflicts


# ------------------------------------------------------------------------------------------ loading
def _leaf_keys(model: type[BaseModel], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.add(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys |= _leaf_keys(ann, dotted + ".")
    return keys


def _field_adapter(dotted: str) -> TypeAdapter[Any] | None:
    """A validator of the one config field at ``dotted`` (its type and bounds), or ``None`` if not a field."""
    model: type[BaseModel] = PipelineConfig
    *sections, leaf = dotted.split(".")
    for part in sections:
        ann = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    field = model.model_fields.get(leaf)
    if field is None:
        return None
    return TypeAdapter(Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation)


def _suggest(key: str, valid: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    if dotted.startswith("tune.search_space.") and len(parts) > 3:
        # Search-space keys are themselves dotted config keys: keep them whole.
        parts = [*parts[:2], ".".join(parts[2:])]
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``dotted.key=value`` override; the value is read as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from None
    return key, value


def _format_validation_error(exc: ValidationError, origin: str, valid: set[str], shown: str = "") -> str:
    # ``shown``: the key ``origin`` already names (``--set train.lr=-1``), not repeated after it
    errors = exc.errors()
    err = errors[0]
    key = [p for p in err["loc"] if not _is_union_tag(p)]
    loc = ".".join(str(p) for p in key if not isinstance(p, int))
    loc_full = ".".join(str(p) for p in key)
    if err["type"] == "extra_forbidden":
        return f"{origin}: unknown key {loc!r}{_suggest(loc, valid)}"
    msg = err["msg"].removeprefix("Value error, ")
    # a value that fits no branch of a union (``int >= 1 | 'auto'``) fails once per branch, at one key
    branches = [e for e in errors[1:] if [p for p in e["loc"] if not _is_union_tag(p)] == key]
    if branches and len(branches) == len(errors) - 1:
        alternatives = (e["msg"].removeprefix("Value error, ").removeprefix("Input should be ") for e in branches)
        msg, errors = ", or ".join([msg, *alternatives]), [err]
    extra = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if not loc_full and _key_in_message(msg):  # a whole-tree check names its key first
        return f"{origin}: {msg}{extra}"
    if shown and (not loc_full or loc_full == shown or shown.startswith(loc_full + ".")):
        return f"{origin}: {msg}{extra}"
    where = loc_full or "config"
    return f"{origin}: {where}: {msg}{extra}"


def _key_in_message(msg: str) -> str:
    """The dotted key a whole-tree check's message starts with (``data.label_column: ...``), or ``""``."""
    match = re.match(r"(?:Value error, )?([a-z_]+(?:\.[a-z_]+)+): ", msg)
    return match.group(1) if match else ""


_UNION_TAGS = {"files", "directory", "builtin", "hf", "float", "int", "categorical"}


def _is_union_tag(part: object) -> bool:
    """A location part naming a union's branch (``int``, ``constrained-int``, ``literal['auto']``), not a key."""
    return isinstance(part, str) and (part in _UNION_TAGS or part.startswith(("constrained-", "literal[")))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load the config tree from a YAML file plus ``dotted.key=value`` overrides.

    Args:
        path: YAML file; ``None`` starts from the built-in defaults.
        overrides: ``--set`` strings, applied in order after the file.

    Returns:
        The validated config.

    Raises:
        ConfigError: with one line naming the file (and line) or key at fault.
    """
    tree: dict[str, Any] = {}
    origin = "config"
    text = ""
    if path is not None:
        origin = str(path)
        text = read_config_text(path)
        loaded = parse_yaml(text, path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys")
        tree = loaded
    valid = _leaf_keys(PipelineConfig)
    override_items: dict[str, str] = {}  # key -> the ``--set`` text that set it last
    for item in overrides or []:
        key, value = parse_override(item)
        if key not in valid and not _under_free_section(key):
            raise ConfigError(f"--set {key}: unknown key{_suggest(key, valid)}")
        _set_dotted(tree, key, value)
        override_items.pop(key, None)
        override_items[key] = item.strip()
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        dotted = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) and p not in _UNION_TAGS)
        dotted = dotted or _key_in_message(err["msg"])
        blamed = _blamed_override(dotted, err["msg"], override_items)
        if blamed is not None:
            raise ConfigError(_format_validation_error(exc, f"--set {override_items[blamed]}", valid, blamed)) from None
        indexed = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or dotted
        inner = re.match(r"(?:Value error, )?([\w.]+): ", err["msg"])  # a section's check naming its own key
        line = line_of_key(text, f"{indexed}.{inner.group(1)}" if inner and indexed else indexed) if text else None
        where = f"{origin}:{line}" if line else origin
        raise ConfigError(_format_validation_error(exc, where, valid)) from None


def _blamed_override(dotted: str, msg: str, override_items: dict[str, str]) -> str | None:
    """The ``--set`` key an error at ``dotted`` comes from, or ``None`` when the file is to blame.

    An error at the key itself or inside it is the override's; so is a section check (``train``) whose
    message names a key the override set (``nproc_per_node``). The latest matching override wins.
    """
    for key in reversed(override_items):
        if dotted and (dotted == key or dotted.startswith(key + ".")):
            return key
        named = re.search(rf"\b{re.escape(key.rsplit('.', 1)[-1])}\b", msg)
        if named and (not dotted or key.startswith(dotted + ".")):
            return key
    return None


def _under_free_section(key: str) -> bool:
    # Keys inside dict- or list-valued fields cannot be enumerated in advance.
    return key.startswith(
        ("tune.search_space.", "data.sources.", "deploy.cpu_pool.job_variables.", "deploy.gpu_pool.job_variables.")
    )


def dump_config(cfg: PipelineConfig) -> str:
    """The resolved config as YAML (what gets logged as ``resolved_config.yaml``), secrets redacted."""
    return yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to dotted keys (lists are kept as their JSON text)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        elif isinstance(value, (list, dict)):
            out[dotted] = json.dumps(value)
        else:
            out[dotted] = value
    return out


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) key names a secret and must never be logged.

    ``token`` counts only as a whole word (``hf_token``, ``token``), not inside ``tokenizer`` or
    ``max_new_tokens``.
    """
    leaf = key.lower().split(".")[-1]
    words = set(re.split(r"[^a-z0-9]+", leaf))
    if "token" in words or leaf.endswith("token"):
        return True
    return (
        any(marker in leaf for marker in SECRET_MARKERS if marker != "token") or leaf.endswith("_key") or leaf == "key"
    )


# user:password@ in any URL (the password may itself hold ':' or '@': the last '@' before a space ends it),
# and password-like query parameters (?password=..., as libpq and SQLAlchemy accept them).
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*:)(?P<password>[^\s]*)@")
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&](?:password|passwd|pwd|sslpassword)=)[^&\s]*", re.IGNORECASE)


def mask_url_secrets(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``.

    ``postgresql+asyncpg://forgeline:s3cret@db:5432/prefect`` becomes
    ``postgresql+asyncpg://forgeline:***@db:5432/prefect``; a URL without a password is unchanged.
    """
    masked = _URL_PASSWORD.sub(lambda m: f"{m['head']}***@", text)
    return _QUERY_PASSWORD.sub(lambda m: f"{m['head']}***", masked)


def redact(tree: Any, key: str = "") -> Any:
    """Copy of a nested structure with secret-named keys replaced by ``***`` and URL passwords masked."""
    if isinstance(tree, dict):
        return {k: ("***" if is_secret_key(str(k)) and v else redact(v, str(k))) for k, v in tree.items()}
    if isinstance(tree, list):
        return [redact(v, key) for v in tree]
    if isinstance(tree, str):
        return mask_url_secrets(tree)
    return tree
