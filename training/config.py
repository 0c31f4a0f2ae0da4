"""Configuration of the training stages: the loop shared by continued pretraining and distillation, its data,
and the teacher-logits stage.

Only dataclasses and their checks live here, importing nothing heavy: every CLI command loads these, and only
the jobs that train need torch, numpy or the shard readers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from slurm.resources import Resources


def _at_least(obj: object, low: float, *names: str) -> None:
    """Each field at least `low` (and finite: TOML has nan and inf)."""
    for name in names:
        value = getattr(obj, name)
        if not (math.isfinite(value) and value >= low):
            raise ValueError(f"{name} must be at least {low}, got {value}")


def _within(obj: object, name: str, low: float, high: float, *, low_open: bool = False,
            high_open: bool = False) -> None:
    """The field in the interval from `low` to `high`, each end closed unless said open."""
    value = getattr(obj, name)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):  # false for nan too
        raise ValueError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}, "
                         f"got {value}")


@dataclass(frozen=True)
class DataConfig:
    sources: tuple[str, ...] = ()  # shard folders to mix, e.g. domain then replay ("" or none: this run's shards)
    weights: tuple[float, ...] = ()  # mixing weight per source, e.g. [0.95, 0.05] (empty: equal weights)
    names: tuple[str, ...] = ()  # name per source in logs and metrics (empty: the folder names)
    seed: int = 1234  # seeds the per-epoch shuffle of every source; the mixing order itself is fixed
    split: str = "train"  # which split of every source to train on
    verify_hashes: bool = False  # also sha256 every shard at start (reads all data); always: sizes, each batch's XXH3
    max_open_shards: int = 64  # shard readers open per source (LRU): a file handle + a 16 KiB decoded batch each
    prefetch: bool = True  # read the next micro-batch in a background thread while the current one trains

    def __post_init__(self) -> None:
        for name in ("weights", "names"):
            if getattr(self, name) and len(getattr(self, name)) != len(self.sources):
                raise ValueError(f"{name} must be empty or have one entry per source ({len(self.sources)}), "
                                 f"got {len(getattr(self, name))}")
        if any(not (math.isfinite(w) and w > 0) for w in self.weights):
            raise ValueError(f"weights must be positive and finite, got {list(self.weights)}")
        if self.seed < 0:
            raise ValueError(f"seed must be at least 0, got {self.seed}")
        if not self.split:
            raise ValueError("split must be a split name such as 'train'")
        if self.max_open_shards < 1:
            raise ValueError(f"max_open_shards must be at least 1, got {self.max_open_shards}")


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # a local Hugging Face causal-LM folder (config.json + safetensors); never downloaded
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on a GPU with it (fp32 master weights), else fp32
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"  # auto: flash-attn on GPU in bf16 if
    # installed, else what transformers picks (sdpa where the architecture has it)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    document_mask: bool = True  # attention kept inside each packed document, positions restarting after EOS
    dropout: float = -1.0  # attention/hidden dropout during training (-1: keep the model's own setting)

    def __post_init__(self) -> None:
        if self.dropout != -1.0:
            _within(self, "dropout", 0.0, 1.0, high_open=True)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-5  # peak learning rate after the re-warm
    min_lr_ratio: float = 0.1  # floor of the re-decay, as a fraction of the peak
    warmup_steps: int = 100  # optimizer steps of linear re-warm from zero
    schedule: Literal["cosine", "wsd"] = "cosine"  # cosine decay, or warmup-stable-decay
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying at the end
    weight_decay: float = 0.1  # AdamW decoupled weight decay (an overfitting defence on small domains)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: off)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive, got {self.lr}")
        _within(self, "min_lr_ratio", 0.0, 1.0)
        _at_least(self, 0, "warmup_steps", "weight_decay", "grad_clip")
        _within(self, "decay_fraction", 0.0, 1.0, low_open=True)
        _within(self, "beta1", 0.0, 1.0, high_open=True)
        _within(self, "beta2", 0.0, 1.0, high_open=True)
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be positive, got {self.eps}")


@dataclass(frozen=True)
class EngineConfig:
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3: what is sharded across ranks (optimizer, +grads, +params)
    micro_batch: int = 1  # sequences per rank per forward pass
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = micro_batch * grad_accum * ranks)
    offload_optimizer: bool = False  # keep optimizer state in CPU memory (ZeRO 1-3)
    offload_params: bool = False  # keep parameters in CPU memory (ZeRO 3)
    tf32: bool = True  # on GPU, fp32 matmuls and convolutions on TF32 tensor cores (10-bit mantissa inputs)
    overlap_comm: bool = True  # on GPU, ZeRO 1-2 reduce gradients while the backward pass goes on (DeepSpeed: off)
    overrides: dict[str, str] = field(default_factory=dict)  # DeepSpeed JSON keys, dotted, values as JSON text

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        _at_least(self, 1, "micro_batch", "grad_accum")
        for key in self.overrides:
            if not key or any(not part for part in key.split(".")):
                raise ValueError(f"overrides: {key!r} is not a dotted DeepSpeed key such as zero_optimization.stage")


@dataclass(frozen=True)
class EvalConfig:
    every: int = 100  # evaluate every this many optimizer steps (and at the end)
    batches: int = 20  # most micro-batches per validation set per rank
    patience: int = 0  # stop after this many evaluations without improvement of domain loss (0: never)
    min_delta: float = 0.0  # improvement smaller than this does not count
    forgetting_pct: float = 10.0  # warn when general perplexity rises this many % above the base model's
    forgetting_stop: bool = False  # and then stop the run as early stopping does (checkpoint, export); else warn only

    def __post_init__(self) -> None:
        _at_least(self, 1, "every", "batches")
        _at_least(self, 0, "patience", "min_delta", "forgetting_pct")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 100  # checkpoint every this many optimizer steps (0: only on time and stop)
    every_minutes: float = 30.0  # and at least this often in wall-clock time (0: off)
    keep_last: int = 2  # complete checkpoints kept besides the best one

    def __post_init__(self) -> None:
        _at_least(self, 0, "every_steps", "every_minutes")
        _at_least(self, 1, "keep_last")


@dataclass(frozen=True)
class TrainConfig:
    resources: Resources = field(default_factory=Resources)  # nodes, tasks (one per GPU), time limit
    model: ModelConfig = field(default_factory=ModelConfig)  # the model to train
    data: DataConfig = field(default_factory=DataConfig)  # training shards and mixing weights
    domain_val: str = ""  # shard folder whose val split measures the domain ("": the first source)
    general_val: str = ""  # shard folder whose val split measures forgetting ("": none)
    steps: int = 1000  # optimizer steps in total
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and the LR schedule
    engine: EngineConfig = field(default_factory=EngineConfig)  # DeepSpeed ZeRO, batch sizes
    eval: EvalConfig = field(default_factory=EvalConfig)  # validation, early stopping, forgetting alarm
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # when to save and what to keep
    log_every: int = 10  # write a metrics line every this many steps
    export: Literal["final", "best"] = "final"  # which weights become the Hugging Face export

    def __post_init__(self) -> None:
        _at_least(self, 1, "steps", "log_every")


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    teacher: str = ""  # the teacher's Hugging Face folder ("": this run's cpt export)
    student_layers: int = 0  # derive the student by keeping this many of the teacher's layers (0: model.path)
    student_layer_choice: Literal["influence", "even"] = "influence"  # which: highest block influence, or evenly spaced
    student_bridge: bool = False  # fold a least-squares map for each removed block into the kept layer before it
    student_calibration_rows: int = 32  # training rows the block influence and the bridges are measured on
    alpha: float = 0.5  # weight of the plain cross-entropy; 1 - alpha weighs the distillation term
    temperature: float = 2.0  # softens both distributions in the distillation term (scaled back by T^2)
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"] = "forward_kl"  # D(teacher || student)
    beta: float = 0.5  # mixing weight of jsd and skew_kl
    topk_cache: str = ""  # folder of cached teacher top-k logits (the teacher-logits stage); "": run the teacher
    topk_student_norm: Literal["vocab", "topk"] = "topk"  # cached top-k: student softmax over the k ids or all
    kd_chunk: int = 256  # positions per chunk of the KD loss: its float32 memory is O(chunk x vocabulary); 0: all
    teacher_zero3: bool = False  # shard the live teacher across ranks (DeepSpeed ZeRO-3 inference) instead of copies

    def __post_init__(self) -> None:
        super().__post_init__()
        _within(self, "alpha", 0.0, 1.0)
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        _at_least(self, 0, "student_layers")
        _at_least(self, 1, "student_calibration_rows")
        _at_least(self, 0, "kd_chunk")
        if self.divergence == "jsd":  # beta 0 or 1 makes the JSD identically 0
            _within(self, "beta", 0.0, 1.0, low_open=True, high_open=True)
        elif self.divergence == "skew_kl":  # beta 1 compares the teacher with itself
            _within(self, "beta", 0.0, 1.0, high_open=True)
        else:
            _within(self, "beta", 0.0, 1.0)


@dataclass(frozen=True)
class TeacherLogitsConfig:
    resources: Resources = field(default_factory=Resources)  # per array element (one GPU each on a cluster)
    teacher: str = ""  # the teacher's Hugging Face folder ("": this run's cpt export)
    source: str = ""  # the token shard folder to cache logits for ("": this run's shard output)
    k: int = 64  # logits kept per position (the rest of the distribution is dropped)
    batch: int = 8  # sequences per teacher forward pass
    tasks: int = 2  # job array elements; each takes every tasks-th token shard
    samples: int = 0  # stream samples to cache (0: distill.steps x its global batch in a run with distill, else all)

    def __post_init__(self) -> None:
        _at_least(self, 1, "k", "batch", "tasks")
        if self.samples < 0:
            raise ValueError(f"samples must not be negative, got {self.samples}")
