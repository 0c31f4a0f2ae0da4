"""The shard stage's configuration: [shard] in a run config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from sharding.clean import CleanConfig
from sharding.minhash import MinHashConfig
from sharding.readers import ReaderConfig
from slurm.resources import Resources


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True  # drop documents whose cleaned text equals an earlier document's
    near: bool = True  # drop near-duplicates found by MinHash LSH (the earliest document of a cluster survives)
    minhash: MinHashConfig = field(default_factory=MinHashConfig)  # shingles, permutations, bands, threshold
    previous: tuple[str, ...] = ()  # earlier shard output folders: new documents are deduplicated against them


@dataclass(frozen=True)
class ShardConfig:
    resources: Resources = field(default_factory=Resources)  # per array element and for the reduce job
    inputs: tuple[str, ...] = ()  # files, folders or globs of .jsonl, .jsonl.zst, .parquet or plain text
    tokenizer: str = ""  # a local tokenizer.json, or a folder holding one (never downloaded)
    eos_token: str = ""  # token between documents ("": the tokenizer's <|endoftext|>, </s> or <eos>)
    seq_len: int = 2048  # tokens per packed sequence
    val_fraction: float = 0.01  # share of document groups held out for validation, chosen by hash
    tasks: int = 4  # job array elements that clean and tokenize input files; output is the same for any count
    shard_sequences: int = 16384  # packed sequences per shard file
    encode_batch: int = 256  # documents per tokenizer call
    threads: int = 0  # tokenizer threads per task (0: resources.cpus_per_task)
    reader: ReaderConfig = field(default_factory=ReaderConfig)  # input format: text, id and group fields
    clean: CleanConfig = field(default_factory=CleanConfig)  # ordered cleaning steps and their thresholds
    dedup: DedupConfig = field(default_factory=DedupConfig)  # exact and near-duplicate removal

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("tasks", "shard_sequences", "encode_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def data_config(self) -> dict[str, object]:
        """What decides the bytes of the output: everything but where and how parallel it runs.

        Its hash goes into the manifest, so the manifest is identical for 1 task or 100.
        """
        data = dataclasses.asdict(self)
        for name in ("resources", "tasks", "threads", "encode_batch"):
            data.pop(name)
        return data
