"""Export the trained weights as a Hugging Face folder (safetensors + tokenizer + provenance + model card).

The export is declared done only after it has been loaded back with transformers and its logits
on a fixed batch match the engine's: a silent consolidation error (ZeRO-3 shards, tied weights)
must not reach a user. Like is compared with like: the export runs in the training dtype, on the
engine's device, with the engine's attention implementation, so the same kernels see the same
weights and a correct export reproduces the engine's logits exactly. Its COMPLETE lists every file
with its size and XXH3, written after every file is fsynced.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.publish import publish_json, publishing_dir
from training.config import TrainConfig
from training.model_card import model_card

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json")


# The check's tolerance on max |logit difference|, relative to max(1, max |reference logit|): logits of real
# models reach 20-40, and a bf16 ulp grows with them. Measured with real DeepSpeed engines on CPU (tiny Llamas,
# hidden 32-256, 1-4 layers, ZeRO 0 and 3, after one training step; see docs/training.md): the export loaded
# like the engine reproduces its logits exactly, max |diff| = 0 in fp32 and in bf16. Other kernels on the same
# weights (eager instead of sdpa attention) differ by up to 9e-7 (7e-7 of max |logit|) in fp32 and 0.012
# (0.9%, about one bf16 ulp) in bf16; one weight element off by 1.0 moves the logits by 0.09-0.2. So the
# tolerances stay above kernel noise, should a device's kernels not be deterministic, and below real damage:
# fp32 1e-5 (15x the kernel noise), bf16 2^-5 = 4 bf16 ulps (3.5x it).
RELATIVE_TOLERANCE = {"fp32": 1e-5, "bf16": 2.0 ** -5}


class ExportMismatch(RuntimeError):
    """The saved export does not reproduce the engine's logits: it is not published."""


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
        # ZeRO-3 loads its optimizer states too: without them DeepSpeed rebuilds the weights through zero_to_fp32,
        # which ignores the tag (it reads a `latest` file we do not keep) and gathers the whole fp32 model on
        # every rank (32 GB per rank for 8B). With them each rank reads only its own partition, as on resume.
        engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=cfg.engine.zero_stage == 3,
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
        # Every file is fsynced, COMPLETE (every file's size and XXH3) written last, then the folder replaces
        # an older export.
        with publishing_dir(folder, listing=True) as tmp:
            engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
            state_dict = None  # under ZeRO-3 a full copy in host memory: gone before the check loads another
            for name in TOKENIZER_FILES:
                if (Path(cfg.model.path) / name).exists():
                    shutil.copy2(Path(cfg.model.path) / name, tmp / name)
            publish_json(tmp / "provenance.json", provenance)
            (tmp / "README.md").write_text(model_card(provenance, [cfg.model.path, provenance.get("teacher", "")]))
            if interrupted():
                raise ExportInterrupted("stop signal while writing the export")
            # Before anything is published; the export runs with the engine's kernels (device, dtype, attention).
            result = check_export(tmp, probe, reference, cfg.model.dtype, device=device, label=f"export {folder}",
                                  attn_implementation=getattr(engine.module.config, "_attn_implementation", None))
            if interrupted():
                raise ExportInterrupted("stop signal while checking the export")
        print(f"[train] exported {folder} (max |logit difference| {result['max_logit_diff']:.2e})", flush=True)
    _barrier()
    engine.train()
    return result


def check_export(folder: Path, probe: torch.Tensor, reference: torch.Tensor, dtype: str, *,
                 device: torch.device | None = None, attn_implementation: str | None = None,
                 label: str | None = None) -> dict[str, Any]:
    """Load the export with transformers as the engine ran (`dtype` on `device`, its attention implementation)
    and compare its logits on `probe` with the engine's `reference`; ExportMismatch beyond the tolerance.

    Cost: a second copy of the weights on `device` (rank 0's GPU: 16 GB for an 8B model in bf16, on top of
    training's memory), staged through host memory, for one forward of 2 x 32 tokens; freed before returning.
    """
    from transformers import AutoModelForCausalLM

    device = device or torch.device("cpu")
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32, **kwargs)
    try:
        model.to(device).eval()
        with torch.no_grad():
            logits = model(input_ids=probe.to(device)).logits.float().cpu()
        parameters = sum(p.numel() for p in model.parameters())
    finally:
        del model
        gc.collect()  # should a reference cycle hold the copy, it must go now, not when the collector next runs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    reference = reference.float().cpu()
    diff = float((logits - reference).abs().max())
    tolerance = RELATIVE_TOLERANCE[dtype] * max(1.0, float(reference.abs().max()))
    if not diff <= tolerance:
        raise ExportMismatch(f"{label or folder} does not reproduce the trained model: max logit difference "
                             f"{diff:.3g} > {tolerance:.3g} ({dtype} on {device}, as the engine ran); not published")
    return {"max_logit_diff": diff, "tolerance": tolerance, "parameters": parameters}
