"""Tiny Llama-style causal LMs built from a config and a local tokenizer: for tests and offline demos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def build_tiny_llama(tokenizer_json: Path, out: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                     max_positions: int = 512, seed: int = 0) -> Path:
    """A randomly initialised LlamaForCausalLM saved with its tokenizer as a Hugging Face folder."""
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    eos = "<|endoftext|>"
    eos_id = tokenizer.token_to_id(eos)
    if eos_id is None:
        raise ValueError(f"{tokenizer_json} has no {eos} token")
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), hidden_size=hidden,
                         intermediate_size=hidden * 2, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=max_positions, tie_word_embeddings=True,
                         bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    shutil.copy2(tokenizer_json, out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos, "pad_token": eos,
        "model_max_length": max_positions}, indent=1))
    return out
