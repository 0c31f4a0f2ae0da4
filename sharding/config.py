"""The shard stage's configuration: [shard] in a run config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from slurm.resources import Resources


@dataclass(frozen=True)
class QualityConfig:
    min_words: int = 50  # fewer whitespace-separated words: quality.too_few_words
    max_words: int = 100_000  # more words: quality.too_many_words
    min_mean_word_length: float = 3.0  # shorter mean word length (characters): quality.mean_word_length
    max_mean_word_length: float = 10.0  # longer mean word length: quality.mean_word_length
    max_symbol_word_ratio: float = 0.1  # more '#', or more '...' and '…', per word: quality.symbol_ratio
    min_alpha_words: float = 0.8  # smaller share of words holding a letter: quality.alpha_words
    min_stop_words: int = 2  # fewer stop words (English prose has many; 0 turns this off): quality.stop_words
    stop_words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")  # Gopher's stop words
    bullets: tuple[str, ...] = ("•", "-", "*", "·", "‣", "◦", "▪", "●", "–")  # line starts that mark a list item
    max_bullet_lines: float = 0.9  # larger share of lines starting with a bullet: quality.bullet_lines
    max_ellipsis_lines: float = 0.3  # larger share of lines ending in '...' or '…': quality.ellipsis_lines
    max_dup_lines: float = 0.3  # larger share of lines that repeat an earlier line: quality.dup_lines
    max_dup_line_chars: float = 0.2  # larger share of characters in repeated lines: quality.dup_line_chars
    max_dup_paragraphs: float = 0.3  # larger share of paragraphs that repeat an earlier one: quality.dup_paragraphs
    max_dup_paragraph_chars: float = 0.2  # larger character share of repeated paragraphs: quality.dup_paragraph_chars
    max_top_2gram: float = 0.20  # larger share of characters in the most frequent word 2-gram: quality.top_2gram
    max_top_3gram: float = 0.18  # same for the most frequent 3-gram: quality.top_3gram
    max_top_4gram: float = 0.16  # same for the most frequent 4-gram: quality.top_4gram
    max_dup_5gram: float = 0.15  # larger share of characters in repeated word 5-grams: quality.dup_5gram
    max_dup_6gram: float = 0.14  # same for repeated 6-grams: quality.dup_6gram
    max_dup_7gram: float = 0.13  # same for repeated 7-grams: quality.dup_7gram
    max_dup_8gram: float = 0.12  # same for repeated 8-grams: quality.dup_8gram
    max_dup_9gram: float = 0.11  # same for repeated 9-grams: quality.dup_9gram
    max_dup_10gram: float = 0.10  # same for repeated 10-grams: quality.dup_10gram

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int | float) and not value >= 0:  # nan too
                raise ValueError(f"{f.name} must not be negative, got {value}")
            if f.name.startswith(("max_dup", "max_top", "max_bullet", "max_ellipsis", "min_alpha")) and value > 1:
                raise ValueError(f"{f.name} must be a fraction in [0, 1], got {value}")
        if self.min_words > self.max_words:
            raise ValueError(f"min_words must not exceed max_words ({self.min_words} > {self.max_words})")
        if self.min_mean_word_length > self.max_mean_word_length:
            raise ValueError(f"min_mean_word_length must not exceed max_mean_word_length "
                             f"({self.min_mean_word_length} > {self.max_mean_word_length})")


STEP_NAMES = ("normalize", "quality", "pii", "decontaminate")


@dataclass(frozen=True)
class NormalizeConfig:
    nfc: bool = True  # compose to Unicode NFC, so equal-looking texts have equal code points (dedup, tokens)
    strip_control: bool = True  # drop control characters but newline and tab; CR, CRLF, VT, FF, U+2028 become newlines
    unicode_spaces: bool = True  # no-break, thin, ideographic and other Unicode spaces become plain spaces
    collapse_spaces: bool = True  # runs of spaces/tabs inside a line become one space; leading indentation is kept
    max_blank_lines: int = 1  # longer runs of blank lines are shortened to this many (trailing spaces always go)

    def __post_init__(self) -> None:
        if self.max_blank_lines < 0:
            raise ValueError(f"max_blank_lines must not be negative, got {self.max_blank_lines}")


@dataclass(frozen=True)
class PiiConfig:
    email: bool = True  # replace e-mail addresses with email_placeholder
    ip: bool = True  # replace IPv4 and IPv6 addresses with ip_placeholder
    phone: bool = True  # replace phone numbers (international +..., US, European 0...) with phone_placeholder
    email_placeholder: str = "<EMAIL>"  # what an e-mail address becomes
    ip_placeholder: str = "<IP>"  # what an IP address becomes
    phone_placeholder: str = "<PHONE>"  # what a phone number becomes


@dataclass(frozen=True)
class DecontamConfig:
    eval_files: tuple[str, ...] = ()  # benchmark files/folders/globs (text, .jsonl, .jsonl.zst, .parquet); () = off
    ngram: int = 13  # words per window: a document sharing any such window with an eval text is dropped (GPT-3)
    min_words: int = 8  # eval texts shorter than ngram are matched whole if they have at least this many words
    text_field: str = ""  # field of the eval texts in JSONL/Parquet ("": the reader's text_field)

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ValueError(f"ngram must be at least 1, got {self.ngram}")
        if not 1 <= self.min_words <= self.ngram:
            raise ValueError(f"min_words must be in [1, ngram], got {self.min_words}")


@dataclass(frozen=True)
class CleanConfig:
    steps: tuple[str, ...] = STEP_NAMES  # steps in the order they run: normalize, quality, pii, decontaminate
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)  # Unicode and whitespace normalisation
    quality: QualityConfig = field(default_factory=QualityConfig)  # Gopher quality and repetition thresholds
    pii: PiiConfig = field(default_factory=PiiConfig)  # which personal data to replace, and with what
    decontaminate: DecontamConfig = field(default_factory=DecontamConfig)  # benchmark n-gram overlap removal

    def __post_init__(self) -> None:
        for name in self.steps:
            if name not in STEP_NAMES:
                raise ValueError(f"steps must be names from {', '.join(STEP_NAMES)}; got '{name}'")
        if len(set(self.steps)) != len(self.steps):
            raise ValueError(f"steps must not repeat a step, got {list(self.steps)}")


@dataclass(frozen=True)
class MinHashConfig:
    ngram: int = 5  # words per shingle; a document with fewer words is one shingle of all its words
    num_perm: int = 112  # signature length: hash permutations per document
    bands: int = 16  # LSH bands; rows per band = num_perm // bands, more bands find lower similarities
    threshold: float = 0.75  # estimated Jaccard (share of equal signature rows) making an LSH candidate a duplicate
    seed: int = 1  # seeds the permutations; signatures made with different seeds are not comparable

    def __post_init__(self) -> None:
        for name in ("ngram", "num_perm", "bands"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm must be divisible by bands ({self.bands}), got {self.num_perm}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands


@dataclass(frozen=True)
class ReaderConfig:
    text_field: str = "text"  # JSONL key / Parquet column holding the document text
    id_field: str = ""  # key / column naming each document in logs ("": none, "<file name>:<record>" instead)
    group_field: str = ""  # key / column the train/validation split hashes ("": none, the text itself)
    max_doc_bytes: int = 2_000_000  # bigger records (JSONL line, Parquet text, text file) are dropped as read.too_long

    def __post_init__(self) -> None:
        if not self.text_field:
            raise ValueError("text_field must not be empty")
        if self.max_doc_bytes < 1:
            raise ValueError(f"max_doc_bytes must be at least 1, got {self.max_doc_bytes}")


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True  # drop documents whose cleaned text equals an earlier document's
    near: bool = True  # drop near-duplicates found by MinHash LSH (the earliest document of a cluster survives)
    minhash: MinHashConfig = field(default_factory=MinHashConfig)  # shingles, permutations, bands, threshold
    previous: tuple[str, ...] = ()  # earlier shard output folders: new documents are deduplicated against them
    buckets: int = 4  # dedup array elements: each holds ~2.2 KB x documents / buckets at its peak (output unchanged)

    def __post_init__(self) -> None:
        if self.buckets < 1:
            raise ValueError(f"buckets must be at least 1, got {self.buckets}")


@dataclass(frozen=True)
class ShardConfig:
    resources: Resources = field(default_factory=Resources)  # per array element and for the reduce job
    inputs: tuple[str, ...] = ()  # files, folders or globs of .jsonl, .jsonl.zst, .jsonl.gz, .parquet or plain text
    tokenizer: str = ""  # a local tokenizer.json, or a folder with one or with a SentencePiece tokenizer.model
    eos_token: str = ""  # token between documents ("": the tokenizer's <|endoftext|>, </s> or <eos>)
    seq_len: int = 2048  # tokens per packed sequence
    val_fraction: float = 0.01  # share of document groups held out for validation, chosen by hash
    tasks: int = 4  # job array elements that clean and tokenize input files; output is the same for any count
    split_mb: float = 1024.0  # JSONL and Parquet files larger than this are mapped in pieces of it (0: never split)
    shard_sequences: int = 16384  # packed sequences per shard file
    pack_shards: int = 8  # shards' worth of input tokens per packing group (parallel unit; its tail row is dropped)
    encode_batch: int = 256  # documents per tokenizer call
    threads: int = 0  # tokenizer threads per task (0: resources.cpus_per_task)
    workers: int = 0  # processes that clean and tokenize per map task (0: resources.cpus_per_task; 1: in the task)
    reader: ReaderConfig = field(default_factory=ReaderConfig)  # input format: text, id and group fields
    clean: CleanConfig = field(default_factory=CleanConfig)  # ordered cleaning steps and their thresholds
    dedup: DedupConfig = field(default_factory=DedupConfig)  # exact and near-duplicate removal

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("tasks", "shard_sequences", "encode_batch", "pack_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("threads", "workers", "split_mb"):
            if not getattr(self, name) >= 0:  # nan too
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")

    def data_config(self) -> dict[str, object]:
        """What decides the bytes of the output: everything but where and how parallel it runs.

        Its hash goes into the manifest, so the manifest is identical for 1 task or 100.
        """
        data = dataclasses.asdict(self)
        for name in ("resources", "tasks", "threads", "workers", "encode_batch"):
            data.pop(name)
        data["dedup"].pop("buckets")  # type: ignore[union-attr]
        return data
