"""Shard stage throughput, measured side by side in one run on the same documents.

    .venv/bin/python benchmarks/shard_throughput.py [--mb 36] [--threads 2] [--workers 2] [--docs 600]
        [--skip-datatrove]

Figures (goal):
  end-to-end shard stage / bare `encode_batch`, same tokenizer and threads   (>= 0.85)
  the same with cleaning and tokenizing in the task's one process (shard.workers = 1), side by side
  MinHash signatures, ours / datasketch `MinHash.bulk`, same shingles         (>= 2)
  near-duplicate precision and recall on planted near copies                 (>= 0.95 each)
  end-to-end shard stage / datatrove's equivalent pipeline                   (>= 5)

The documents are the project's corpora (built from installed packages) mixed round-robin up to
--mb MB of text; the tokenizer is a 49,152-entry byte-level BPE trained on them (SmolLM2's size),
cached in .cache/bench. End-to-end means everything the stage does: read the JSONL, normalise,
quality and repetition filters, PII scrubbing, exact and MinHash dedup, tokenize, pack, write
zstd Arrow shards and the manifest, in one task. The bare tokenizer is timed before and after the
stage and averaged, so a change in machine load hits both sides. Needs `pip install datasketch
datatrove` (benchmark only; `make bench` installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from _bench import emit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
CACHE = REPO / ".cache" / "bench"
VOCAB = 49152
BATCH = 256


def bench_corpus(mb: float) -> tuple[Path, list[str]]:
    """One JSONL of real English text mixed from every corpus, and its texts."""
    from sharding.corpus import build_all, read_corpus

    path = CACHE / f"mixed-{mb:g}mb.jsonl"
    if not path.exists():
        streams = [iter(read_corpus(p)) for p in build_all(CACHE / "corpora").values()]
        size, lines = 0, []
        while size < mb * 1e6 and streams:
            for stream in list(streams):
                record = next(stream, None)
                if record is None:
                    streams.remove(stream)
                    continue
                lines.append(json.dumps({"id": record["id"], "text": record["text"], "group": record["group"]}))
                size += len(record["text"].encode())
        path.write_text("\n".join(lines) + "\n")
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    return path, texts


def bench_tokenizer(texts: list[str], mb: float) -> Path:
    from sharding.tokenize import train_bpe_tokenizer

    folder = CACHE / f"bpe-{VOCAB}-{mb:g}mb"
    if not (folder / "tokenizer.json").exists():
        print(f"training a {VOCAB}-entry BPE tokenizer on {mb:g} MB (once, cached)...", flush=True)
        train_bpe_tokenizer(texts, VOCAB, folder)
    return folder / "tokenizer.json"


def bare_encode(tokenizer_path: Path, texts: list[str]) -> float:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    start = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        tokenizer.encode_batch_fast(texts[i:i + BATCH], add_special_tokens=False)
    return time.perf_counter() - start


def end_to_end(corpus: Path, tokenizer_path: Path, threads: int, workers: int) -> tuple[float, dict[str, object]]:
    from launcher.config import config_hash
    from launcher.run_config import load_run_config
    from sharding.reduce import run_all

    out = CACHE / "shard-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = load_run_config(None, [f"shard.inputs=[{json.dumps(str(corpus))}]", f"shard.tokenizer={tokenizer_path}",
                                 "shard.tasks=1", f"shard.threads={threads}", f"shard.workers={workers}",
                                 "shard.reader.group_field=group"]).shard
    start = time.perf_counter()
    stats = run_all(cfg, out, config_hash(cfg.data_config()))
    return time.perf_counter() - start, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=36.0, help="MB of English text (default 36)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="tokenizer threads, both sides")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="map worker processes (shard.workers) of the end-to-end run (default: the cores)")
    parser.add_argument("--docs", type=int, default=600,
                        help="distinct documents for near-dup precision/recall (default 600; fewer for a small --mb)")
    parser.add_argument("--skip-datatrove", action="store_true", help="leave out the datatrove comparison")
    args = parser.parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # before the tokenizer's thread pool starts
    CACHE.mkdir(parents=True, exist_ok=True)
    corpus, texts = bench_corpus(args.mb)
    mb = sum(len(t.encode()) for t in texts) / 1e6
    tokenizer_path = bench_tokenizer(texts, args.mb)
    print(f"{len(texts)} documents, {mb:.1f} MB; tokenizer threads {args.threads}", flush=True)

    bare_before = bare_encode(tokenizer_path, texts)
    ours_s, stats = end_to_end(corpus, tokenizer_path, args.threads, args.workers)
    one_s, one_stats = end_to_end(corpus, tokenizer_path, args.threads, 1)
    bare_after = bare_encode(tokenizer_path, texts)
    assert one_stats == stats, "the shard stage's output depends on shard.workers"
    bare = mb / ((bare_before + bare_after) / 2)
    ours, one = mb / ours_s, mb / one_s
    print(f"shard stage kept {stats['docs_kept']} of {stats['docs_in']} documents; end-to-end {ours:.2f} MB/s with "
          f"{args.workers} workers, {one:.2f} MB/s in one process; bare encode_batch {bare:.2f} MB/s", flush=True)

    import numpy as np
    from minhash_quality import distinct_bases, quality, scattered_edits, span_edits, throughput

    from sharding.minhash import MinHashConfig

    minhash = MinHashConfig()
    mh_ours, mh_theirs, _ = throughput(texts, minhash, 3)
    bases = distinct_bases(texts, args.docs, minhash.ngram)
    rows: list[tuple[str, str, str, bool | None]] = [
        ("bare encode_batch MB/s", f"{bare:.2f}", "", None),
        ("end-to-end shard stage MB/s", f"{ours:.2f}", "", None),
        ("end-to-end / bare encode_batch", f"{ours / bare:.2f}", ">= 0.85", ours / bare >= 0.85),
        ("end-to-end in one process (shard.workers = 1) MB/s", f"{one:.2f}", "", None),
        ("end-to-end in one process / bare encode_batch", f"{one / bare:.2f}", "", None),
        ("MinHash MB/s ours / datasketch", f"{mh_ours:.2f} / {mh_theirs:.2f}", "", None),
        ("MinHash ours / datasketch", f"{mh_ours / mh_theirs:.2f}", ">= 2", mh_ours / mh_theirs >= 2),
    ]
    for name, edit in (("span edits", span_edits), ("scattered edits", scattered_edits)):
        precision, found, jaccard = quality(bases, len(bases) // 3, edit, minhash, np.random.default_rng(1))
        recall = float(found.mean())
        near = jaccard >= minhash.threshold  # planted pairs that are near-duplicates by the configured threshold
        recall_near = float(found[near].mean()) if near.any() else float("nan")
        rows += [(f"near-dup precision, 5-10% {name}", f"{precision:.3f}", ">= 0.95", precision >= 0.95),
                 (f"near-dup recall, 5-10% {name}", f"{recall:.3f}", ">= 0.95", recall >= 0.95),
                 (f"  recall on pairs with Jaccard >= {minhash.threshold} ({int(near.sum())} of {len(found)})",
                  f"{recall_near:.3f}", "", None)]
    if not args.skip_datatrove:
        from datatrove_baseline import run_datatrove

        workdir = CACHE / "datatrove"
        shutil.rmtree(workdir, ignore_errors=True)
        theirs = run_datatrove(corpus, tokenizer_path, workdir)
        dt = mb / float(theirs["seconds"])
        rows += [("datatrove pipeline MB/s", f"{dt:.2f}", "", None),
                 ("end-to-end / datatrove", f"{ours / dt:.2f}", ">= 5", ours / dt >= 5)]
    width = max(len(r[0]) for r in rows)
    print(f"\n{'figure':<{width}}  {'measured':>13}  {'goal':>8}  verdict")
    for figure, measured, goal, ok in rows:
        print(f"{figure:<{width}}  {measured:>13}  {goal:>8}  {'' if ok is None else 'pass' if ok else 'short'}")
    emit(rows)


if __name__ == "__main__":
    main()
