"""Weak scaling of the shard stage: documents, map tasks and dedup buckets all grow by the same factor, and each
step's largest task should stay the same size.

    .venv/bin/python benchmarks/shard_scale.py [--scales 1 4 16] [--docs 125000] [--parallel 2]

For each scale k: k x --docs synthetic documents (60-word texts over a 5,000-word vocabulary; a fifth exact copies,
a fifth near copies with two words changed) in 4k JSONL files, shard.tasks = k, shard.dedup.buckets = k. Every
element of every step (map, dedup, cluster, pack, finish) runs in its own process, --parallel at a time, and its
peak RSS (ru_maxrss from wait4) and wall time are recorded. Printed per scale and step: the largest task's peak
RSS, the slowest task's wall time, the step's total task-seconds, and the bytes the step wrote. The figure with a
goal: the largest task's peak RSS at the largest scale / at scale 1, for every step (goal <= 1.5). Cleaning is
normalisation only, so the figures are those of the dedup and packing machinery, not of the quality filters.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _bench import emit  # noqa: E402

CACHE = REPO / ".cache" / "bench" / "shard-scale"
STEPS = ("map", "dedup", "cluster", "pack", "finish")
FILES_PER_TASK = 4

TASK = """
import json, sys
from pathlib import Path
from launcher.config import config_hash
from launcher.run_config import load_run_config
from sharding import reduce, stage
step, element, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
cfg = load_run_config(None, json.loads(sys.argv[4])).shard
if step == "map":
    stage.map_files(cfg, out, element, cfg.tasks)
elif step == "dedup":
    reduce.dedup_bucket(cfg, out, element)
elif step == "cluster":
    reduce.cluster_pairs(cfg, out)
elif step == "pack":
    reduce.pack_step(cfg, out, element, cfg.tasks)
else:
    reduce.finish(cfg, out, config_hash(cfg.data_config()))
"""


def write_corpus(folder: Path, docs: int, files: int, seed: int = 0) -> None:
    if (folder / "DONE").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(5000)]
    originals: list[str] = []
    handles = [open(folder / f"{i:05d}.jsonl", "w") for i in range(files)]  # noqa: SIM115 - closed below
    for n in range(docs):
        kind = rng.random()
        if kind < 0.2 and originals:
            text = rng.choice(originals)
        elif kind < 0.4 and originals:
            words = rng.choice(originals).split()
            for _ in range(2):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            text = " ".join(words)
        else:
            text = " ".join(rng.choices(vocab, k=60))
            if len(originals) < 20000:
                originals.append(text)
            else:
                originals[rng.randrange(len(originals))] = text
        handles[n * files // docs].write(json.dumps({"text": text}) + "\n")
    for handle in handles:
        handle.close()
    (folder / "DONE").write_text("")


def tokenizer() -> Path:
    from sharding.tokenize import train_bpe_tokenizer

    path = CACHE / "tokenizer" / "tokenizer.json"
    if not path.exists():
        rng = random.Random(1)
        train_bpe_tokenizer((" ".join(rng.choices([f"w{i}" for i in range(5000)], k=60)) for _ in range(20000)),
                            8192, path.parent)
    return path


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_step(step: str, elements: int, out: Path, overrides: list[str], parallel: int) -> list[tuple[float, float]]:
    """(peak RSS MB, wall s) of every element, `parallel` processes at a time."""
    results: list[tuple[float, float]] = []
    pending = list(range(elements))
    running: dict[int, float] = {}
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    while pending or running:
        while pending and len(running) < parallel:
            element = pending.pop(0)
            proc = subprocess.Popen([sys.executable, "-c", TASK, step, str(element), str(out), json.dumps(overrides)],
                                    env=env, stdout=subprocess.DEVNULL)
            running[proc.pid] = time.perf_counter()
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        if status:
            raise RuntimeError(f"{step} element failed (status {status}); rerun the task by hand to see why")
        results.append((usage.ru_maxrss / 1024, time.perf_counter() - running.pop(pid)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16], help="growth factors (default 1 4 16)")
    parser.add_argument("--docs", type=int, default=125_000, help="documents per map task (default 125,000)")
    parser.add_argument("--parallel", type=int, default=os.cpu_count() or 1, help="task processes at once")
    args = parser.parse_args()
    CACHE.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    peaks: dict[int, dict[str, float]] = {}
    for k in args.scales:
        inputs, out = CACHE / f"corpus-{args.docs}-x{k}", CACHE / f"out-x{k}"
        write_corpus(inputs, args.docs * k, FILES_PER_TASK * k)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        overrides = [f"shard.inputs=[{json.dumps(str(inputs / '*.jsonl'))}]", f"shard.tokenizer={tok}",
                     f"shard.tasks={k}", f"shard.dedup.buckets={k}", "shard.threads=1", "shard.seq_len=1024",
                     "shard.shard_sequences=2048", 'shard.clean.steps=["normalize"]']
        peaks[k] = {}
        print(f"scale x{k}: {args.docs * k:,} documents, {FILES_PER_TASK * k} files, {k} tasks, {k} buckets",
              flush=True)
        for step in STEPS:
            before = folder_bytes(out)
            elements = {"map": k, "dedup": k, "pack": k}.get(step, 1)
            results = run_step(step, elements, out, overrides, args.parallel)
            written = folder_bytes(out) - before
            peaks[k][step] = max(r for r, _ in results)
            print(f"  {step:8s} {elements:3d} tasks: largest peak RSS {peaks[k][step]:8.1f} MB, slowest "
                  f"{max(w for _, w in results):7.1f} s, {sum(w for _, w in results):8.1f} task-s, "
                  f"{written / 1e6:+9.1f} MB written (net)", flush=True)
        stats = json.loads((out / "stats.json").read_text())
        print(f"  kept {stats['docs_kept']:,} of {stats['docs_in']:,}; dropped {stats['dropped']}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    lo, hi = min(args.scales), max(args.scales)
    emit([(f"shard {step}: largest task's peak RSS x{hi} / x{lo}", f"{peaks[hi][step] / peaks[lo][step]:.2f}",
           "<= 1.5", peaks[hi][step] / peaks[lo][step] <= 1.5) for step in STEPS])


if __name__ == "__main__":
    main()
