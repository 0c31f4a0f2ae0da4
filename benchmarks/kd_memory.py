"""Peak memory of the distillation loss, chunked over positions (distill.kd_chunk) against all positions at once.

    .venv/bin/python benchmarks/kd_memory.py [--vocab 131072] [--seq 2048] [--batch 1] [--chunks 0 256]
        [--dtype float32]

Each case runs in a fresh process: random student logits (B, T, V) and either teacher logits of the same shape
(live) or a random top-k of 64 values and ids per position (the cache: the full teacher is never made), then the
loss and its backward pass, as one distillation micro-step does after the models' forward passes. Peak RSS
(VmHWM, reset once the inputs are made) above what the inputs hold is the loss's own memory, the student
logits' gradient (one tensor of the logits' size, which any loss needs) included; blocks of 64 KiB and more are
mapped and unmapped one by one (MALLOC_MMAP_THRESHOLD_), so RSS is what the process holds. chunk 0 is the loss
before chunking: every position at once through plain autograd. Times are one forward + backward.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import emit  # noqa: E402

MB = 1 << 20


def _status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def one(kind: str, chunk: int, vocab: int, seq: int, batch: int, dtype: str) -> dict[str, float]:
    """In this process: (extra peak RSS in MB, seconds) of one loss forward + backward."""
    import torch

    from training.kd import kd_loss, kd_loss_topk

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    student = torch.randn(batch, seq, vocab, dtype=dt).requires_grad_(True)
    labels = torch.randint(0, vocab, (batch, seq))
    if kind == "live":
        teacher = torch.randn(batch, seq, vocab, dtype=dt)
    else:  # what the cache gives: 64 values and ids per position (an id twice in a row is rare, and harmless here)
        values = torch.randn(batch, seq, 64).sort(dim=-1, descending=True).values.half()
        indices = torch.randint(0, vocab, (batch, seq, 64), dtype=torch.int32)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM): making the inputs peaked higher
    base = _status("VmRSS")
    start = time.perf_counter()
    args: dict[str, Any] = {"alpha": 0.5, "temperature": 2.0, "divergence": "forward_kl", "chunk": chunk}
    if kind == "live":
        loss, _ = kd_loss(student, teacher, labels, **args)
    else:
        loss, _ = kd_loss_topk(student, values, indices, labels, student_norm="vocab", **args)
    (grad,) = torch.autograd.grad(loss, student)  # what lm_head's backward receives; no leaf .grad to fill
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    logits = student.numel() * student.element_size() / MB
    return {"extra_mb": (peak - base) / MB, "seconds": seconds, "logits_mb": logits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 256])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--one", nargs=2, metavar=("KIND", "CHUNK"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.vocab, args.seq, args.batch, args.dtype)))
        return
    rows = []
    # A fixed mmap threshold: glibc otherwise raises it to 32 MB after the first large free and keeps freed
    # chunk-sized blocks in its heap, so RSS would count memory the loss no longer holds.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)}
    print(f"V = {args.vocab}, T = {args.seq}, B = {args.batch}, {args.dtype} logits")
    for kind in ("live", "topk"):
        results = {}
        for chunk in args.chunks:
            done = subprocess.run([sys.executable, __file__, "--one", kind, str(chunk), "--vocab", str(args.vocab),
                                   "--seq", str(args.seq), "--batch", str(args.batch), "--dtype", args.dtype],
                                  check=True, capture_output=True, text=True, env=env)
            results[chunk] = r = json.loads(done.stdout.splitlines()[-1])
            print(f"  {kind:>4} teacher, chunk {chunk:>5}: peak {r['extra_mb']:8.0f} MB above the inputs "
                  f"({r['extra_mb'] / r['logits_mb']:.2f}x the logits' {r['logits_mb']:.0f} MB), "
                  f"{r['seconds']:.2f} s", flush=True)
            rows.append((f"KD loss peak MB above inputs, {kind} teacher, chunk {chunk}, V {args.vocab}, T {args.seq}, "
                         f"B {args.batch}, {args.dtype}", f"{r['extra_mb']:.0f}", "", None))
        if 0 in results and len(results) > 1:
            best = min(c for c in results if c)
            ratio = results[0]["extra_mb"] / results[best]["extra_mb"]
            rows.append((f"KD loss peak, all at once / chunk {best}, {kind} teacher", f"{ratio:.2f}", "", None))
            rows.append((f"KD loss time, chunk {best} / all at once, {kind} teacher",
                         f"{results[best]['seconds'] / results[0]['seconds']:.2f}", "", None))
    emit(rows)


if __name__ == "__main__":
    main()
