"""Tokenizer loading (local files only) and packing documents into fixed-length sequences."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from common.missing import MissingInput
from sharding.shards import as_token_ids

# Tried in order when no EOS token is configured: GPT-2/SmolLM style, Llama/T5 style, Gemma style.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")


class TokenizerError(ValueError):
    """The tokenizer cannot be used; one line saying why."""


class TokenizerMissing(TokenizerError, MissingInput):
    """No tokenizer file where one was named."""


@dataclass(frozen=True)
class TokenizerInfo:
    path: str  # the file read: a tokenizer.json, or a SentencePiece tokenizer.model converted by transformers
    sha256: str  # fingerprint: sha256 of the tokenizer.json's bytes (of the converted one's, for SentencePiece)
    vocab_size: int  # entries, added tokens included
    id_bound: int  # the highest id any entry (added tokens included) maps to, + 1: what the shard dtype must hold
    eos_id: int


SENTENCEPIECE = "tokenizer.model"  # a SentencePiece model, as Llama-2, Mistral and Gemma folders ship it


def resolve_tokenizer_file(path: str) -> Path:
    """The file a tokenizer is read from: `path` itself, or in a folder its tokenizer.json, else its SentencePiece
    tokenizer.model (converted to a tokenizer.json in memory by `load_tokenizer`)."""
    candidate = Path(path)
    if path and candidate.is_dir():
        if not (candidate / "tokenizer.json").is_file() and (candidate / SENTENCEPIECE).is_file():
            return (candidate / SENTENCEPIECE).resolve()
        candidate = candidate / "tokenizer.json"
    if not path or not candidate.is_file():
        raise TokenizerMissing(f"tokenizer '{path}' not found: give a tokenizer.json, or a folder holding one or a "
                             f"SentencePiece {SENTENCEPIECE} (stillroom never downloads tokenizers)")
    return candidate.resolve()


def _from_sentencepiece(model: Path) -> Tokenizer:
    """The fast tokenizer transformers makes of a SentencePiece folder (the one `AutoTokenizer` gives its users, so
    shards hold the ids the model sees), as a `tokenizers.Tokenizer`. Conversion reads the model's protobuf."""
    import importlib.util

    missing = [name for name, module in (("sentencepiece", "sentencepiece"), ("protobuf", "google.protobuf"))
               if importlib.util.find_spec(module.split(".")[0]) is None]
    if missing:
        raise TokenizerError(f"tokenizer {model.parent} is a SentencePiece model ({SENTENCEPIECE}) without a "
                             f"tokenizer.json; converting it needs {' and '.join(missing)}: "
                             "pip install 'stillroom[sentencepiece]'")
    import sentencepiece
    from transformers import AutoTokenizer

    try:  # transformers falls back to reading a bad file as tiktoken's and blames a missing tiktoken: check first
        sentencepiece.SentencePieceProcessor(model_proto=model.read_bytes())
    except (RuntimeError, TypeError, OSError) as e:
        raise TokenizerError(f"tokenizer {model} is not a readable SentencePiece model: "
                             f"{(str(e).strip().splitlines() or [''])[0]}") from None
    try:
        converted = AutoTokenizer.from_pretrained(str(model.parent), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; the first line says which
        first = (str(e).strip().splitlines() or [""])[0]
        raise TokenizerError(f"tokenizer {model} could not be converted by transformers: "
                             f"{type(e).__name__}: {first}") from None
    if not getattr(converted, "is_fast", False):
        raise TokenizerError(f"tokenizer {model}: transformers made no fast tokenizer of it")
    return converted.backend_tokenizer


def _read(file: Path) -> tuple[Tokenizer, str]:
    """The tokenizer in `file` and its fingerprint: sha256 of its tokenizer.json (converted, for SentencePiece:
    the conversion is deterministic, and a transformers release that converts differently changes it)."""
    if file.name == SENTENCEPIECE:
        tokenizer = _from_sentencepiece(file)
        return tokenizer, hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception with its parser message
        raise TokenizerError(f"tokenizer {file} is unreadable: {str(e).splitlines()[0]}") from None
    return tokenizer, hashlib.sha256(file.read_bytes()).hexdigest()


def load_tokenizer(path: str, eos_token: str = "") -> tuple[Tokenizer, TokenizerInfo]:
    file = resolve_tokenizer_file(path)
    tokenizer, sha256 = _read(file)
    names = (eos_token,) if eos_token else EOS_CANDIDATES
    eos_id = next((i for name in names if (i := tokenizer.token_to_id(name)) is not None), None)
    if eos_id is None:
        raise TokenizerError(f"tokenizer {file} has no end-of-document token among {', '.join(names)}; "
                             "set shard.eos_token")
    # Ids need not be dense (a vocabulary with gaps, added tokens placed high): the count is no bound on them.
    highest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    info = TokenizerInfo(path=str(file), sha256=sha256, vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
                         id_bound=highest + 1, eos_id=eos_id)
    return tokenizer, info


def tokenizer_fingerprint(path: str | Path) -> str:
    """The tokenizer's identity, as shards record it: every check that two things share a tokenizer compares these."""
    file = resolve_tokenizer_file(str(path))
    return _read(file)[1] if file.name == SENTENCEPIECE else hashlib.sha256(file.read_bytes()).hexdigest()


class Packer:
    """Concatenates documents, each followed by EOS, and cuts rows of exactly seq_len tokens.

    Nothing is padded: the last partial row of a split is dropped and reported as `tail_tokens`.
    """

    def __init__(self, seq_len: int, eos_id: int, dtype: np.dtype[Any]) -> None:
        self.seq_len, self.eos = seq_len, np.array([eos_id], dtype=dtype)
        self.dtype = dtype
        self._parts: list[np.ndarray] = []
        self._pending = 0

    def add(self, tokens: np.ndarray) -> np.ndarray:
        """Append one document; return the rows completed by it, shape (k, seq_len)."""
        self._parts += [as_token_ids(tokens, self.dtype, "packing"), self.eos]
        self._pending += len(tokens) + 1
        if self._pending < self.seq_len:
            return np.empty((0, self.seq_len), dtype=self.dtype)
        flat = np.concatenate(self._parts)
        full = len(flat) // self.seq_len * self.seq_len
        rest = flat[full:]
        self._parts, self._pending = [rest], len(rest)
        return flat[:full].reshape(-1, self.seq_len)

    @property
    def tail_tokens(self) -> int:
        return self._pending


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> Path:
    """A byte-level BPE tokenizer trained on `texts`, saved as out_dir/tokenizer.json.

    For tiny test models and offline demos: stillroom never downloads a tokenizer.
    """
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_CANDIDATES[0]],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tokenizer.save(str(path))
    return path
