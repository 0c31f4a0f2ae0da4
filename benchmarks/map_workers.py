"""The map step alone with shard.workers = 1, 2, ...: wall time and peak RSS of the task's process and of its
largest worker, each count in a fresh process, side by side in one run, on the same documents.

    .venv/bin/python benchmarks/map_workers.py [--mb 36] [--workers 1 2] [--threads 2]

The documents and the tokenizer are shard_throughput.py's (the project's corpora mixed up to --mb MB, a
49,152-entry BPE), cached in .cache/bench. Full cleaning; one map task over the one file.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import emit  # noqa: E402


def one(corpus: Path, tokenizer: Path, workers: int, threads: int, out: Path) -> dict[str, float]:
    """In this process: one map task, its seconds and peak RSS (MB) of itself and of its largest child."""
    from launcher.run_config import load_run_config
    from sharding.stage import map_files

    cfg = load_run_config(None, [f"shard.inputs=[{json.dumps(str(corpus))}]", f"shard.tokenizer={tokenizer}",
                                 "shard.tasks=1", f"shard.threads={threads}", f"shard.workers={workers}",
                                 "shard.reader.group_field=group"]).shard
    start = time.perf_counter()
    map_files(cfg, out, 0, 1)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "task_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=36.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=2, help="shard.threads: tokenizer threads in all")
    parser.add_argument("--one", nargs=3, metavar=("CORPUS", "TOKENIZER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(Path(args.one[0]), Path(args.one[1]), args.workers[0], args.threads, Path(args.one[2]))))
        return
    from shard_throughput import bench_corpus, bench_tokenizer

    corpus, texts = bench_corpus(args.mb)
    tokenizer = bench_tokenizer(texts, args.mb)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    rows, tallies = [], []
    print(f"{len(texts)} documents, {mb:.1f} MB; shard.threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            out = Path(tmp) / f"w{workers}"
            done = subprocess.run([sys.executable, __file__, "--one", str(corpus), str(tokenizer), str(out),
                                   "--workers", str(workers), "--threads", str(args.threads)],
                                  check=True, capture_output=True, text=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            tallies.append(sorted((p.name, p.read_bytes()) for p in (out / "work").iterdir()))
            shutil.rmtree(out)
            print(f"workers {workers}: {r['seconds']:.1f} s ({mb / r['seconds']:.2f} MB/s), peak RSS task "
                  f"{r['task_mb']:.0f} MB, largest worker {r['worker_mb']:.0f} MB", flush=True)
            rows += [(f"map step, shard.workers = {workers}: MB/s", f"{mb / r['seconds']:.2f}", "", None),
                     (f"map step, shard.workers = {workers}: peak RSS task / largest worker (MB)",
                      f"{r['task_mb']:.0f} / {r['worker_mb']:.0f}", "", None)]
    assert all(t == tallies[0] for t in tallies), "the work files depend on shard.workers"
    emit(rows)


if __name__ == "__main__":
    main()
