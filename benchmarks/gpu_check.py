"""The prepared GPU check: one command, a few minutes on one GPU, one table.

    python benchmarks/gpu_check.py [--steps 30] [--seq 2048] [--peak-tflops 0] [--quick]

What it runs, through stillroom's own engine code (training/engine.py's device defaults, DeepSpeed config and
ZeRO-3 loading, training/doc_mask.py's feed, training/kd.py's chunked loss, training/export.py's check):
  1. an NCCL all-reduce (one rank) and the time of a 256 MB one;
  2. bf16 ZeRO-2 continued pretraining of SmolLM2-135M's architecture and of a ~1 B Llama, both built from a
     config (random weights: nothing is downloaded), --steps optimizer steps on packed random rows with document
     masking: tokens/s and MFU = 6 x parameters x tokens/s / the device's dense bf16 peak; the 135M again without
     masking, for what masking costs on this GPU and attention kernel;
  3. one KD step of the 135M student against a cached top-64 of the teacher, with the peak GPU memory;
  4. the export check in bf16: the model saved, loaded with transformers as the engine ran, logits compared.
--quick runs everything tiny, on CPU when there is no GPU: a check of the script, not of a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device name, for MFU; --peak-tflops overrides.
PEAKS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
EOS = 0
ARCHS = {  # name -> (LlamaConfig fields, micro-batch)
    "smollm2-135m": ({"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                      "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                      "tie_word_embeddings": True}, 8),
    "llama-1b": ({"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True}, 4),
}
QUICK = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True}


def _row(rows: list[list[str]], *cells: object) -> None:
    rows.append([str(c) for c in cells])
    print("  " + " | ".join(rows[-1]), flush=True)


def nccl_check(device: torch.device) -> dict[str, Any]:
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=0, world_size=1)
    buffer = torch.ones(64 << 20 if device.type == "cuda" else 1 << 16, device=device)
    dist.all_reduce(buffer)
    _sync(device)
    start = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(buffer)
    _sync(device)
    return {"backend": dist.get_backend(), "ms": (time.perf_counter() - start) / 5 * 1e3,
            "mb": buffer.numel() * 4 / 1e6, "ok": bool(buffer[0].item() == 1.0)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(arch: dict[str, Any], folder: Path, dtype: torch.dtype) -> Path:
    """A Llama of `arch` with random weights, saved with a minimal tokenizer-free config: what load_model reads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, eos_token_id=EOS, bos_token_id=EOS, **arch)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def train_config(model: Path, micro: int, zero: int, document_mask: bool) -> Any:
    from launcher.run_config import load_run_config

    overrides = [f"cpt.model.path={model}", f"cpt.engine.zero_stage={zero}", f"cpt.engine.micro_batch={micro}",
                 "cpt.model.dropout=0.0", f"cpt.model.document_mask={str(document_mask).lower()}"]
    if shutil.which("nvcc") is None:  # FusedAdam is compiled at first use; without nvcc, torch's AdamW
        overrides.append('cpt.engine.overrides={"optimizer.params.torch_adam" = "true"}')
    return load_run_config(None, overrides).cpt


def rows_for(batch: int, seq: int, vocab: int, device: torch.device) -> torch.Tensor:
    rows = torch.randint(1, vocab, (batch, seq), device=device)
    rows[:, torch.arange(seq, device=device) % 512 == 511] = EOS  # documents of 512 tokens
    return rows


def cpt_check(name: str, arch: dict[str, Any], micro: int, args: argparse.Namespace, device: torch.device,
              work: Path, peak: float, document_mask: bool = True) -> dict[str, Any]:
    from training.doc_mask import Feed
    from training.engine import build_engine, for_device, load_for_engine

    folder = work / name
    if not folder.exists():
        build(arch, folder, torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = for_device(train_config(folder, micro, 2, document_mask), device)
    engine = build_engine(cfg, load_for_engine(cfg, device.type == "cuda"), device.type == "cuda")
    params = sum(p.numel() for p in engine.module.parameters())
    feed = Feed(EOS, cfg.model.document_mask)
    rows = rows_for(micro, args.seq, arch["vocab_size"], device)
    for step in range(args.steps + 2):  # two warm-up steps: kernels chosen, buffers allocated
        if step == 2:
            _sync(device)
            start = time.perf_counter()
        loss = engine(**feed(rows), labels=rows).loss
        engine.backward(loss)
        engine.step()
    _sync(device)
    seconds = time.perf_counter() - start
    tokens_per_s = args.steps * micro * args.seq / seconds
    mfu = 6 * params * tokens_per_s / (peak * 1e12) if peak else float("nan")
    result = {"params": params, "tokens_per_s": tokens_per_s, "mfu": mfu, "loss": float(loss.detach()),
              "dtype": cfg.model.dtype, "attention": engine.module.config._attn_implementation,
              "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}
    if name.startswith("smollm2") and document_mask:
        result["export"] = export_check(engine, cfg, feed, rows, device, work / f"{name}-export")
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def export_check(engine: Any, cfg: Any, feed: Any, rows: torch.Tensor, device: torch.device,
                 folder: Path) -> dict[str, Any]:
    from training.export import check_export

    engine.eval()
    probe = rows[:1, :128]
    with torch.no_grad():
        reference = engine(input_ids=probe).logits.float()  # as check_export runs the export: one causal row
    engine.module.save_pretrained(folder, safe_serialization=True)
    try:
        result = check_export(folder, probe, reference, cfg.model.dtype, device=device, label="gpu check",
                              attn_implementation=engine.module.config._attn_implementation)
        return {"ok": True, **{k: v for k, v in result.items() if isinstance(v, int | float)}}
    except Exception as e:  # the table shows it; the check goes on
        return {"ok": False, "error": " ".join(str(e).split())[:200]}


def kd_check(arch: dict[str, Any], micro: int, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.kd import kd_loss_topk

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    student = LlamaForCausalLM(LlamaConfig(eos_token_id=EOS, **arch)).to(device, dtype)
    rows = rows_for(micro, args.seq, arch["vocab_size"], device)
    values = torch.randn(micro, args.seq, 64, device=device).sort(-1, descending=True).values.half()
    indices = torch.randint(0, arch["vocab_size"], (micro, args.seq, 64), device=device, dtype=torch.int32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    loss, _ = kd_loss_topk(student(input_ids=rows).logits, values, indices, rows, alpha=0.5, temperature=2.0,
                           divergence="forward_kl", student_norm="vocab")
    loss.backward()
    _sync(device)
    return {"seconds": time.perf_counter() - start, "loss": float(loss.detach()),
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak (0: from the device name)")
    parser.add_argument("--quick", action="store_true", help="tiny models, CPU when there is no GPU")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    if not gpu and not args.quick:
        sys.exit("gpu_check: no GPU here (torch.cuda.is_available() is False); --quick checks the script on CPU")
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    name = torch.cuda.get_device_name(0) if gpu else "cpu"
    peak = args.peak_tflops or next((p for key, p in PEAKS.items() if key in name), 0.0)
    archs = {k: (QUICK, 2) for k in ARCHS} if args.quick else ARCHS
    if args.quick:
        args.steps, args.seq = min(args.steps, 3), min(args.seq, 128)
    rows: list[list[str]] = []
    results: dict[str, Any] = {"device": name, "torch": torch.__version__, "peak_tflops": peak,
                               "bf16": gpu and torch.cuda.is_bf16_supported()}
    print(f"gpu_check on {name} (torch {torch.__version__}, dense bf16 peak {peak or '?'} TFLOP/s)", flush=True)
    results["nccl"] = nccl = nccl_check(device)
    _row(rows, "all-reduce", nccl["backend"], f"{nccl['mb']:.0f} MB in {nccl['ms']:.2f} ms", "ok" if nccl["ok"] else
         "WRONG SUM")
    with tempfile.TemporaryDirectory() as tmp:
        for arch_name, (arch, micro) in archs.items():
            r = results[arch_name] = cpt_check(arch_name, arch, micro, args, device, Path(tmp), peak)
            _row(rows, f"cpt {arch_name}", f"{r['params'] / 1e6:.0f} M params, {r['dtype']}, {r['attention']}",
                 f"{r['tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.1%}, peak {r['peak_gb']:.1f} GiB",
                 f"loss {r['loss']:.3f}")
            if "export" in r:
                _row(rows, f"export {arch_name}", "bf16 check" if gpu else "fp32 check",
                     "ok" if r["export"]["ok"] else r["export"].get("error", "failed"), "")
                plain = results[f"{arch_name}-unmasked"] = cpt_check(arch_name, arch, micro, args, device, Path(tmp),
                                                                     peak, document_mask=False)
                cost = plain["tokens_per_s"] / r["tokens_per_s"] - 1
                _row(rows, f"cpt {arch_name}, no document mask", "the same steps",
                     f"{plain['tokens_per_s']:,.0f} tok/s", f"masking costs {cost:+.1%} of the rate")
        arch, micro = archs["smollm2-135m"]
        results["kd"] = kd = kd_check(arch, micro, args, device)
        _row(rows, "kd step, cached top-64", f"micro-batch {micro} x {args.seq}", f"{kd['seconds'] * 1e3:.0f} ms",
             f"peak {kd['peak_gb']:.1f} GiB")
    print("\n| check | what | measured | |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
