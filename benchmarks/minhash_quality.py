"""MinHash speed against datasketch, and near-duplicate precision/recall on planted copies.

    .venv/bin/python benchmarks/minhash_quality.py [--mb 20] [--docs 1500] [--repeat 3]
                                                   [--ngram 5 --bands 16 --threshold 0.75]

Needs `pip install datasketch` (benchmark only). English text comes from what the machine has:
the Python documentation sources, the licenses in /usr/share/common-licenses and the packages'
copyright files. Everything is seeded; only the timings vary between runs.

Speed: both sides get the same documents in batches of 256, the same num_perm and the same
shingles. Ours is timed from the raw text (splitting, hashing and all). datasketch is timed twice:
`MinHash.bulk` alone over shingle byte strings made beforehand (its best case, the goal's
baseline), and with making those byte strings. Each batch runs `--repeat` times, alternating
between the two sides, and its best time counts, so bursts of other work on the machine hit
neither side.

Quality: base documents chosen so that no two share a true 5-gram Jaccard of 0.3 or more (the
copyright files repeat license texts, which would otherwise be unplanted duplicates), near copies
of some of them with 5-10% of their words edited, and the rest left as unrelated documents. Truth
is the planted (base, copy) pairs; a predicted pair is two documents `duplicate_of` puts in one
cluster. Two edit patterns are reported, because they land on opposite sides of the threshold:
edits in a few contiguous spans (a rewritten sentence, a dropped paragraph) and single words
scattered over the text. With 5-word shingles one edited word changes up to five shingles.
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from _bench import emit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sharding.minhash import MinHashConfig, MinHasher, duplicate_of, shingles  # noqa: E402

SOURCES = ("/usr/share/doc/python3*/html/_sources/**/*.txt", "/usr/share/common-licenses/*",
           "/usr/share/doc/*/copyright")
BATCH = 256  # documents per signatures() call, as the shard stage's encode_batch
BASE_NGRAM = 5  # shingles for choosing unrelated base documents, whatever configuration is measured


def load_documents(rng: np.random.Generator) -> list[str]:
    """Paragraph runs of 1-8 KB from the local English text, shuffled."""
    paths = sorted({p for pattern in SOURCES for p in glob.glob(pattern, recursive=True) if Path(p).is_file()})
    docs: list[str] = []
    for path in paths:
        try:
            paragraphs = Path(path).read_text(encoding="utf-8").split("\n\n")
        except (UnicodeDecodeError, OSError):
            continue
        target, current = rng.integers(1000, 8000), []
        for paragraph in paragraphs:
            current.append(paragraph)
            if sum(map(len, current)) >= target:
                docs.append("\n\n".join(current))
                target, current = rng.integers(1000, 8000), []
        if current:
            docs.append("\n\n".join(current))
    if not docs:
        sys.exit(f"no English text found under {SOURCES}")
    return [docs[i] for i in rng.permutation(len(docs))]


def first_mb(docs: list[str], mb: float) -> list[str]:
    """The first documents making `mb` MB, cycling through them again if there are fewer."""
    out: list[str] = []
    size = 0
    while size < mb * 1e6:
        for doc in docs:
            out.append(doc)
            size += len(doc.encode())
            if size >= mb * 1e6:
                break
    return out


def throughput(docs: list[str], cfg: MinHashConfig, repeat: int) -> tuple[float, float, float]:
    """MB/s of ours, of datasketch's bulk over given shingles, and of datasketch with the shingling."""
    try:
        from datasketch import MinHash
    except ImportError:
        sys.exit("the speed comparison needs datasketch: .venv/bin/pip install datasketch")

    hasher = MinHasher(cfg)
    ours = theirs = shingling = 0.0
    for start in range(0, len(docs), BATCH):
        batch = docs[start:start + BATCH]
        best = [float("inf")] * 3
        for _ in range(repeat):  # best of `repeat`, alternating, so a burst of other work hits neither side
            t0 = time.perf_counter()
            hasher.signatures(batch)
            t1 = time.perf_counter()
            shingled = [shingles(text, cfg.ngram) for text in batch]
            t2 = time.perf_counter()
            MinHash.bulk(shingled, num_perm=cfg.num_perm)
            t3 = time.perf_counter()
            best = [min(b, t) for b, t in zip(best, (t1 - t0, t3 - t2, t2 - t1), strict=True)]
        ours, theirs, shingling = ours + best[0], theirs + best[1], shingling + best[2]
    mb = sum(len(d.encode()) for d in docs) / 1e6
    return mb / ours, mb / theirs, mb / (theirs + shingling)


def distinct_bases(docs: list[str], count: int, ngram: int) -> list[str]:
    """`count` documents of 150-1500 words, no two with a true shingle Jaccard of 0.3 or more."""
    chosen: list[str] = []
    sets: list[set[bytes]] = []
    postings: dict[bytes, list[int]] = {}
    for text in dict.fromkeys(docs):
        if not 150 <= len(text.split()) <= 1500:
            continue
        mine = set(shingles(text, ngram))
        shared = Counter(j for s in mine for j in postings.get(s, ()))
        if any(k / (len(mine) + len(sets[j]) - k) >= 0.3 for j, k in shared.items()):
            continue
        for s in mine:
            postings.setdefault(s, []).append(len(chosen))
        chosen.append(text)
        sets.append(mine)
        if len(chosen) == count:
            return chosen
    sys.exit(f"only {len(chosen)} distinct documents of 150-1500 words found, {count} wanted")


def span_edits(words: list[str], vocab: list[str], rng: np.random.Generator) -> list[str]:
    budget = round(rng.uniform(0.05, 0.10) * len(words))
    spans = int(rng.integers(1, 4))
    out = list(words)
    for i in range(spans):
        length = budget // spans + (i < budget % spans)
        at = int(rng.integers(0, len(out) - length))
        new = [vocab[j] for j in rng.integers(0, len(vocab), length)]
        op = rng.integers(3)
        out[at:at + length] = new if op == 0 else [] if op == 1 else out[at:at + length] + new
    return out


def scattered_edits(words: list[str], vocab: list[str], rng: np.random.Generator) -> list[str]:
    out = list(words)
    for _ in range(round(rng.uniform(0.05, 0.10) * len(words))):
        at, op, new = int(rng.integers(0, len(out))), rng.integers(3), vocab[int(rng.integers(len(vocab)))]
        if op == 0:
            out[at] = new
        elif op == 1:
            del out[at]
        else:
            out.insert(at, new)
    return out


def jaccard(a: str, b: str, ngram: int) -> float:
    sa, sb = set(shingles(a, ngram)), set(shingles(b, ngram))
    return len(sa & sb) / len(sa | sb)


def quality(bases: list[str], copies: int, edit: Callable[..., list[str]], cfg: MinHashConfig,
            rng: np.random.Generator) -> tuple[float, np.ndarray, np.ndarray]:
    """Precision, and per planted pair: found or not, its true Jaccard."""
    vocab = sorted({w for text in bases for w in text.split()})
    texts = list(bases) + [" ".join(edit(bases[i].split(), vocab, rng)) for i in range(copies)]
    truth = [(i, len(bases) + i) for i in range(copies)]
    keys = rng.permutation(len(texts)).astype(np.int64)  # global order unrelated to the planting
    hasher = MinHasher(cfg)
    sigs = hasher.signatures(texts)
    rep = duplicate_of(keys, sigs, hasher.band_hashes(sigs), cfg.threshold)
    clusters: dict[int, list[int]] = {}
    for i, r in enumerate(rep.tolist()):
        clusters.setdefault(r, []).append(i)
    predicted = {(a, b) for members in clusters.values() for a in members for b in members if a < b}
    found = np.array([pair in predicted for pair in truth])
    precision = len(predicted & set(truth)) / len(predicted) if predicted else 1.0
    return precision, found, np.array([jaccard(texts[a], texts[b], cfg.ngram) for a, b in truth])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=20.0, help="MB of text for the speed comparison")
    parser.add_argument("--docs", type=int, default=1500, help="distinct documents for precision/recall")
    parser.add_argument("--repeat", type=int, default=3, help="timings per batch and side; the best counts")
    parser.add_argument("--seed", type=int, default=0)
    default = MinHashConfig()
    for name in ("ngram", "bands", "threshold"):  # to try another configuration than the shipped one
        parser.add_argument(f"--{name}", type=type(getattr(default, name)), default=getattr(default, name))
    args = parser.parse_args()
    cfg = MinHashConfig(ngram=args.ngram, bands=args.bands, threshold=args.threshold)
    rng = np.random.default_rng(args.seed)
    corpus = load_documents(rng)
    docs = first_mb(corpus, args.mb)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    print(f"speed: {len(docs)} documents, {mb:.1f} MB of the {sum(len(d.encode()) for d in corpus) / 1e6:.1f} MB "
          f"found; {cfg}", flush=True)
    ours, theirs, theirs_all = throughput(docs, cfg, args.repeat)
    bases = distinct_bases(corpus, args.docs, BASE_NGRAM)
    copies = args.docs // 3
    rows = [("signatures MB/s, ours (text in)", f"{ours:.2f}", "", ""),
            ("signatures MB/s, datasketch MinHash.bulk (shingles in)", f"{theirs:.2f}", "", ""),
            ("signatures MB/s, datasketch incl. making shingles", f"{theirs_all:.2f}", "", ""),
            ("speed ratio ours / datasketch bulk", f"{ours / theirs:.2f}", ">= 2", ours / theirs >= 2),
            ("speed ratio ours / datasketch incl. shingles", f"{ours / theirs_all:.2f}", ">= 2",
             ours / theirs_all >= 2)]
    clear = cfg.threshold + 0.05  # 2 sigma of the Jaccard estimate above the threshold, for 112 permutations
    for name, edit in (("edits in 1-3 spans", span_edits), ("single-word edits", scattered_edits)):
        precision, found, jac = quality(bases, copies, edit, cfg, np.random.default_rng(args.seed + 1))
        above = jac >= clear
        rows += [(f"precision, 5-10% {name}", f"{precision:.3f}", ">= 0.95", precision >= 0.95),
                 (f"recall, 5-10% {name} (Jaccard {jac.min():.2f}-{jac.max():.2f}, median {np.median(jac):.2f})",
                  f"{found.mean():.3f}", ">= 0.95", found.mean() >= 0.95)]
        if above.any():
            recall = found[above].mean()
            rows.append((f"  recall of those with Jaccard >= {clear:.2f} ({above.sum()} pairs)", f"{recall:.3f}",
                         ">= 0.95", recall >= 0.95))
    print(f"quality: {copies} planted pairs among {args.docs + copies} documents\n")
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'measured':>9}  {'goal':>8}  verdict")
    for figure, measured, goal, ok in rows:
        verdict = "" if goal == "" else "pass" if ok else "short"
        print(f"{figure:<{width}}  {measured:>9}  {goal:>8}  {verdict}")
    emit(rows)


if __name__ == "__main__":
    main()
