"""Export the trained weights as a Hugging Face folder (safetensors + tokenizer + provenance).

The export is declared done only after it has been loaded back with transformers and its logits
on a fixed batch match the engine's: a silent consolidation error (ZeRO-3 shards, tied weights)
must not reach a user.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.publish import publish_json, publishing_dir
from training.config import TrainConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json")


class ExportInterrupted(RuntimeError):
    """A stop signal came while the export was written: nothing was published, the final checkpoint stands."""


def _never() -> bool:
    return False


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def export_model(engine: Any, cfg: TrainConfig, folder: Path, source: Path | None, device: torch.device, rank: int,
                 provenance: dict[str, Any], interrupted: Callable[[], bool] = _never) -> dict[str, Any]:
    """Write the export from rank 0 (every rank takes part in a ZeRO-3 consolidation).

    `interrupted` is asked between the long parts (writing, loading back): when it says yes, the export is
    abandoned, unpublished, with ExportInterrupted, so that a job told to stop leaves within its signal lead
    time instead of being killed at its limit; the next attempt exports from the final checkpoint.
    """
    if source is not None:  # export the best checkpoint's weights rather than the last ones
        engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=False,
                               load_lr_scheduler_states=False)
    vocab = engine.module.config.vocab_size
    probe = (torch.arange(64, device=device).reshape(2, 32) * 7919 % vocab).long()
    engine.eval()
    with torch.no_grad():
        reference = engine(input_ids=probe).logits.float().cpu()
    if cfg.engine.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    result: dict[str, Any] = {}
    if rank == 0:
        # Every file is fsynced and COMPLETE ("ok") written last, then the folder replaces an older export.
        with publishing_dir(folder) as tmp:
            engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            for name in TOKENIZER_FILES:
                if (Path(cfg.model.path) / name).exists():
                    shutil.copy2(Path(cfg.model.path) / name, tmp / name)
            publish_json(tmp / "provenance.json", provenance)
            if interrupted():
                raise ExportInterrupted("stop signal while writing the export")
            result = check_export(tmp, probe.cpu(), reference, cfg.model.dtype)  # before anything is published
            if interrupted():
                raise ExportInterrupted("stop signal while checking the export")
        print(f"[train] exported {folder} (max |logit difference| {result['max_logit_diff']:.2e})", flush=True)
    _barrier()
    engine.train()
    return result


def check_export(folder: Path, probe: torch.Tensor, reference: torch.Tensor, dtype: str) -> dict[str, Any]:
    """Load the export with transformers and compare its logits with the engine's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=probe).logits.float()
    diff = float((logits - reference).abs().max())
    tolerance = 5e-2 if dtype == "bf16" else 1e-4
    if not diff <= tolerance:
        raise RuntimeError(f"export {folder} does not reproduce the trained model: max logit difference {diff:.3g} "
                           f"> {tolerance}")
    return {"max_logit_diff": diff, "parameters": sum(p.numel() for p in model.parameters())}
