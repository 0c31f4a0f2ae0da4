"""Tokenizer loading (local files only) and packing documents into fixed-length sequences."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from sharding.shards import as_token_ids

# Tried in order when no EOS token is configured: GPT-2/SmolLM style, Llama/T5 style, Gemma style.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>")


class TokenizerError(ValueError):
    """The tokenizer cannot be used; one line saying why."""


@dataclass(frozen=True)
class TokenizerInfo:
    path: str  # the tokenizer.json read
    sha256: str  # fingerprint: sha256 of tokenizer.json's bytes
    vocab_size: int  # entries, added tokens included
    id_bound: int  # the highest id any entry (added tokens included) maps to, + 1: what the shard dtype must hold
    eos_id: int


def resolve_tokenizer_file(path: str) -> Path:
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / "tokenizer.json"
    if not path or not candidate.is_file():
        raise TokenizerError(f"tokenizer '{path}' not found: give a tokenizer.json or a folder holding one "
                             "(stillroom never downloads tokenizers)")
    return candidate.resolve()


def load_tokenizer(path: str, eos_token: str = "") -> tuple[Tokenizer, TokenizerInfo]:
    file = resolve_tokenizer_file(path)
    try:
        tokenizer = Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception with its parser message
        raise TokenizerError(f"tokenizer {file} is unreadable: {str(e).splitlines()[0]}") from None
    names = (eos_token,) if eos_token else EOS_CANDIDATES
    eos_id = next((i for name in names if (i := tokenizer.token_to_id(name)) is not None), None)
    if eos_id is None:
        raise TokenizerError(f"tokenizer {file} has no end-of-document token among {', '.join(names)}; "
                             "set shard.eos_token")
    # Ids need not be dense (a vocabulary with gaps, added tokens placed high): the count is no bound on them.
    highest = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    info = TokenizerInfo(path=str(file), sha256=hashlib.sha256(file.read_bytes()).hexdigest(),
                         vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), id_bound=highest + 1,
                         eos_id=eos_id)
    return tokenizer, info


def tokenizer_fingerprint(path: str) -> str:
    return hashlib.sha256(resolve_tokenizer_file(path).read_bytes()).hexdigest()


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
