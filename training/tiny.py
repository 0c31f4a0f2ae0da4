"""Tiny causal LMs of several architectures, built from a config around a local tokenizer: for tests and offline
demos. Nothing is downloaded: transformers builds each from its config class, randomly initialised."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# The architectures `build_tiny` makes, by Hugging Face model type. The Llama family shares Llama's config names;
# GPT-2 has its own (and learned positions, a fused QKV, tied weights).
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "gpt2")


def _config(arch: str, vocab: int, eos_id: int, hidden: int, layers: int, heads: int, kv_heads: int,
            max_positions: int) -> Any:
    from transformers import AutoConfig

    ids = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                                    n_positions=max_positions, n_inner=hidden * 2, **ids)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: expected one of {', '.join(ARCHITECTURES)}")
    extra = {"head_dim": hidden // heads} if arch == "qwen3" else {}  # Qwen3's own default is 128
    return AutoConfig.for_model(arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                max_position_embeddings=max_positions, tie_word_embeddings=True, **ids, **extra)


def build_tiny(arch: str, tokenizer: Path, out: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
               kv_heads: int | None = None, max_positions: int = 512, seed: int = 0) -> Path:
    """A randomly initialised causal LM of `arch` (one of ARCHITECTURES) saved with its tokenizer as a Hugging Face
    folder. `tokenizer`: a tokenizer.json, or a folder with one or with a SentencePiece tokenizer.model (its
    tokenizer files are copied as they are). `kv_heads` below `heads` gives grouped-query attention (Llama family
    only; default: `heads`). Token ids 0..vocabulary: the end-of-document token is also BOS and padding."""
    import torch  # here, not at the top: the CLI reads ARCHITECTURES without loading torch
    from transformers import AutoModelForCausalLM

    from sharding.tokenize import SENTENCEPIECE, load_tokenizer

    loaded, info = load_tokenizer(str(tokenizer))
    config = _config(arch, max(info.vocab_size, info.id_bound), info.eos_id, hidden, layers, heads,
                     kv_heads or heads, max_positions)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    source = Path(info.path)
    if source.name == SENTENCEPIECE:
        for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
            if (source.parent / name).is_file():
                shutil.copy2(source.parent / name, out / name)
        return out
    shutil.copy2(source, out / "tokenizer.json")
    eos = loaded.id_to_token(info.eos_id)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos, "pad_token": eos,
        "model_max_length": max_positions}, indent=1))
    return out


def build_tiny_llama(tokenizer_json: Path, out: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                     max_positions: int = 512, seed: int = 0) -> Path:
    """A randomly initialised LlamaForCausalLM saved with its tokenizer as a Hugging Face folder."""
    return build_tiny("llama", tokenizer_json, out, hidden=hidden, layers=layers, heads=heads,
                      max_positions=max_positions, seed=seed)
