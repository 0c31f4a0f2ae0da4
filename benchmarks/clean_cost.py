"""Where a map task's core-seconds go, step by step, and the P1 that this cost allows however the work is spread.

    .venv/bin/python benchmarks/clean_cost.py [--mb 8] [--threads 2]

On the same documents as benchmarks/shard_throughput.py (its cached corpus and 49,152-entry BPE), each step of
the map is timed alone on one core, in the order the map runs them (a step sees only the documents the steps
before it kept): JSON parsing, normalise, quality, PII, decontaminate (off unless eval files are given),
exact hash, MinHash signatures, and the tokenizer on one thread. Then bare `encode_batch` on --threads threads
over every document, the P1 baseline, measured before and after the steps and averaged.

With perfect spreading over C cores (workers and nothing else), end to end runs at C / (sum of the steps'
core-s per MB), so P1 <= C / (sum x bare MB/s at C threads): the ceiling printed. The cleaning budget is what
the steps other than the tokenizer may cost for P1 = 0.85 at that tokenizer cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import emit  # noqa: E402
from shard_throughput import BATCH, bare_encode, bench_corpus, bench_tokenizer  # noqa: E402


def one_thread_encode(tokenizer_path: Path, texts: list[str]) -> float:
    """Seconds to tokenize `texts` on one thread, in batches of BATCH, as one map worker process does: in a child
    process, since the tokenizer's thread count is fixed when its pool first starts."""
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(texts, f)
        f.flush()
        code = ("import json, sys, time; from tokenizers import Tokenizer; t = Tokenizer.from_file(sys.argv[1]); "
                "x = json.load(open(sys.argv[2])); s = time.perf_counter(); "
                f"[t.encode_batch_fast(x[i:i + {BATCH}], add_special_tokens=False) "
                f"for i in range(0, len(x), {BATCH})]; "
                "print(time.perf_counter() - s)")
        done = subprocess.run([sys.executable, "-c", code, str(tokenizer_path), f.name], check=True,
                              capture_output=True, text=True, env={**os.environ, "RAYON_NUM_THREADS": "1"})
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="MB of English text (default 8)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores: bare encode_batch threads")
    args = parser.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    from sharding.clean import build_steps
    from sharding.config import ShardConfig
    from sharding.documents import Doc, Tally
    from sharding.minhash import MinHasher, exact_hash

    corpus, texts = bench_corpus(args.mb)
    tokenizer_path = bench_tokenizer(texts, args.mb)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    bare_before = bare_encode(tokenizer_path, texts)

    cost: dict[str, float] = {}  # step -> core-seconds per MB of input
    lines = corpus.read_bytes().splitlines()
    start = time.perf_counter()
    records = [json.loads(line) for line in lines]
    cost["read: JSON parsing"] = (time.perf_counter() - start) / mb
    cfg = ShardConfig()
    docs = [Doc(r["text"], 0, i, str(i), r["group"]) for i, r in enumerate(records)]
    for step in build_steps(cfg.clean, cfg.reader.text_field):
        tally, kept = Tally(), []
        start = time.perf_counter()
        for doc in docs:
            if not step(doc, tally):
                kept.append(doc)
        cost[type(step).__name__] = (time.perf_counter() - start) / mb
        docs = kept
    kept_texts = [d.text for d in docs]
    start = time.perf_counter()
    for text in kept_texts:
        exact_hash(text)
    cost["exact hash"] = (time.perf_counter() - start) / mb
    hasher = MinHasher(cfg.dedup.minhash)
    start = time.perf_counter()
    for i in range(0, len(kept_texts), BATCH):
        hasher.signatures(kept_texts[i:i + BATCH])
    cost["MinHash signatures"] = (time.perf_counter() - start) / mb
    tokenizer = one_thread_encode(tokenizer_path, kept_texts) / mb
    bare = mb / ((bare_before + bare_encode(tokenizer_path, texts)) / 2)

    cleaning = sum(cost.values())
    total = cleaning + tokenizer
    ceiling = args.threads / total / bare
    budget = args.threads / (0.85 * bare) - tokenizer
    print(f"{len(texts)} documents, {mb:.1f} MB, {len(kept_texts)} kept by cleaning; core-seconds per MB of input:")
    for name, seconds in [*cost.items(), ("tokenizer, one thread, kept documents", tokenizer)]:
        print(f"  {name:<40} {seconds:.3f}  ({seconds / total:.0%})")
    print(f"  {'all':<40} {total:.3f}\nbare encode_batch, {args.threads} threads: {bare:.2f} MB/s; P1 ceiling with "
          f"{args.threads} cores {ceiling:.2f}; for P1 0.85 the steps but the tokenizer may cost {budget:.3f} "
          f"core-s/MB, {cleaning / max(budget, 1e-9):.1f}x less than now")
    emit([*((f"map core-s per MB: {name}", f"{seconds:.3f}", "", None) for name, seconds in cost.items()),
          ("map core-s per MB: tokenizer, one thread", f"{tokenizer:.3f}", "", None),
          (f"bare encode_batch MB/s, {args.threads} threads", f"{bare:.2f}", "", None),
          (f"P1 ceiling with {args.threads} cores (perfect spreading)", f"{ceiling:.2f}", ">= 0.85", ceiling >= 0.85),
          ("cleaning now / cleaning budget for P1 0.85", f"{cleaning / max(budget, 1e-9):.1f}", "", None)])


if __name__ == "__main__":
    main()
