"""Baseline for the shard stage: HuggingFace datatrove running the equivalent pipeline on one JSONL file.

Needs datatrove in the venv, for this benchmark only (it is not a project dependency):
    .venv/bin/pip install datatrove spacy orjson "xxhash<4"
datatrove's own install pulls only dill, humanize, loguru and multiprocess; the blocks used here import
orjson (JsonlReader/JsonlWriter), xxhash (MinHash's default hash; 4.x rejects the str datatrove passes, hence
datatrove[processing]'s own <4 pin) and spaCy (the English word tokenizer of both Gopher filters and the MinHash
shingles: `spacy.blank("en")`, no model download).

Each stage is one `LocalPipelineExecutor`, run one after another and timed wall-clock, laid out as in
datatrove's own examples (filter job writing JSONL, the four MinHash jobs, then a tokenization job):
    filter             JsonlReader -> GopherRepetitionFilter -> GopherQualityFilter -> PIIFormatter -> JsonlWriter
    minhash_signature  JsonlReader -> MinhashDedupSignature
    minhash_buckets    MinhashDedupBuckets (16 tasks: datatrove needs one per bucket)
    minhash_cluster    MinhashDedupCluster
    minhash_filter     JsonlReader -> MinhashDedupFilter -> JsonlWriter
    tokenize           JsonlReader -> DocumentTokenizer (the local tokenizer.json, EOS after each document)

Where this differs from `sharding.stage`:
- Nothing needs the network: DocumentTokenizer loads a path that is a file with `Tokenizer.from_file`, and
  HF_HUB_OFFLINE=1 turns any hub lookup into an error instead of a download. NLTK, whose punkt data would
  need a download, is not used: datatrove's English word tokenizer is spaCy's blank pipeline.
- Gopher thresholds are datatrove's defaults, which equal `QualityConfig`'s; but datatrove's words come
  from spaCy's tokenizer (punctuation split off), ours from `str.split`.
- PII: PIIFormatter replaces e-mails and public IPs only; ours also replaces phone numbers. datatrove has no
  counterpart of our Unicode/whitespace `normalize` step or of `decontaminate`; neither is run.
- No exact-dedup stage: identical documents have identical MinHash signatures, so datatrove's MinHash
  already removes them.
- MinHash: same 5-word shingles and 16 bands x 7 rows = 112 permutations, but datatrove shingles
  `simplify_text` output (lowercased, punctuation and digits normalised) with 64-bit xxhash, and drops
  every LSH bucket collision, with no check of estimated Jaccard >= 0.8 as ours does.
- Tokenization writes datatrove's flat uint16 token files (`shuffle_documents=False`: our shards keep
  input order); it does not pack fixed-length sequences or split validation, and it runs after dedup
  where ours tokenizes before.
- With tasks > 1 the input is first split into `tasks` JSONL files, untimed: datatrove parallelises over
  files only, and a real corpus comes in many. Its worker pool uses forkserver, which re-imports __main__,
  so call it from a file or `python -c`, never from a script piped to `python -`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

EOS_TOKEN = "<|endoftext|>"  # what sharding.tokenize.train_bpe_tokenizer puts in; ours also puts EOS between docs


def _split_jsonl(src: Path, folder: Path, parts: int) -> None:
    """Contiguous line ranges of `src` as `parts` files, so each datatrove task gets one."""
    lines = src.read_bytes().splitlines(keepends=True)
    folder.mkdir(parents=True)
    step = -(-len(lines) // parts)
    for i in range(parts):
        (folder / f"part_{i:05d}.jsonl").write_bytes(b"".join(lines[i * step:(i + 1) * step]))


def _documents(stats: Any, reader: Any) -> int:
    """Documents `reader` read, from its executor's merged PipelineStats (blocks are keyed by str(block))."""
    return int(next(s for s in stats.stats if s.name == str(reader)).stats["documents"].total)


def run_datatrove(input_jsonl: Path, tokenizer_json: Path, workdir: Path, tasks: int = 1) -> dict[str, Any]:
    """Runs the pipeline above on `input_jsonl` (field "text"); everything goes under workdir/datatrove."""
    # huggingface_hub reads this when first imported, so it is set before datatrove is.
    os.environ["HF_HUB_OFFLINE"] = "1"
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens import DocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter

    root = workdir / "datatrove"
    # A rerun must not find a previous run's "completed" markers (the executor would skip the work) or files.
    shutil.rmtree(root, ignore_errors=True)
    source = root / "input"
    if tasks > 1:
        _split_jsonl(input_jsonl, source, tasks)
    else:
        source.mkdir(parents=True)
        (source / input_jsonl.name).symlink_to(input_jsonl.resolve())
    filtered, deduped, sigs, buckets, remove, tokens = (
        str(root / name) for name in ("filtered", "deduped", "sigs", "buckets", "remove", "tokens"))
    minhash = MinhashConfig(n_grams=5, num_buckets=16, hashes_per_bucket=7)

    def reader(folder: Path | str) -> JsonlReader:
        return JsonlReader(str(folder), glob_pattern="*.jsonl", text_key="text")

    first, last = reader(source), reader(deduped)
    stages: dict[str, tuple[list[Any], int]] = {
        "filter": ([first, GopherRepetitionFilter(), GopherQualityFilter(), PIIFormatter(),
                    JsonlWriter(filtered, compression=None)], tasks),
        "minhash_signature": ([reader(filtered), MinhashDedupSignature(sigs, config=minhash)], tasks),
        "minhash_buckets": ([MinhashDedupBuckets(sigs, buckets, config=minhash)], minhash.num_buckets),
        "minhash_cluster": ([MinhashDedupCluster(buckets, remove, config=minhash)], 1),
        "minhash_filter": ([reader(filtered), MinhashDedupFilter(remove), JsonlWriter(deduped, compression=None)],
                           tasks),
        "tokenize": ([last, DocumentTokenizer(tokens, str(tokenizer_json.resolve()), eos_token=EOS_TOKEN,
                                              shuffle_documents=False)], tasks),
    }
    stage_seconds: dict[str, float] = {}
    results: dict[str, Any] = {}
    for name, (pipeline, count) in stages.items():
        executor = LocalPipelineExecutor(pipeline, tasks=count, workers=min(tasks, count),
                                         logging_dir=str(root / "logs" / name), skip_completed=False)
        start = time.perf_counter()
        results[name] = executor.run()
        stage_seconds[name] = round(time.perf_counter() - start, 3)
    return {
        "seconds": round(sum(stage_seconds.values()), 3),
        "docs_in": _documents(results["filter"], first),
        "docs_out": _documents(results["tokenize"], last),
        "stage_seconds": stage_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True, help="JSONL with a 'text' field")
    parser.add_argument("--tokenizer", type=Path, required=True, help="a local tokenizer.json")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--tasks", type=int, default=1)
    args = parser.parse_args()
    if args.workdir:
        result = run_datatrove(args.input, args.tokenizer, args.workdir, args.tasks)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_datatrove(args.input, args.tokenizer, Path(tmp), args.tasks)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
