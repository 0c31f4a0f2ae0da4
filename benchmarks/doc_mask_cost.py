"""What document masking costs a training step: forward + backward of a causal LM on packed rows with
`model.document_mask` on and off, interleaved (ABAB...) so that the machine's noise hits both, medians compared.

    .venv/bin/python benchmarks/doc_mask_cost.py [--seq 1024] [--batch 2] [--docs-per-row 4] [--repeats 6]
        [--hidden 256] [--layers 4] [--attention sdpa]

A Llama built from a config (random weights, the vocabulary of SmolLM2), rows packed with documents of random
lengths (about --docs-per-row per row) each ending in EOS. With masking the model gets restarting position ids
and builds a block-diagonal mask; without, one causal sequence per row. Also prints how far the logits of a
row's later documents move when masking is turned on (the attention it removes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _bench import emit  # noqa: E402

from training.doc_mask import Feed  # noqa: E402

EOS = 0
VOCAB = 49152


def packed_rows(batch: int, seq: int, docs: int, generator: torch.Generator) -> torch.Tensor:
    rows = torch.randint(1, VOCAB, (batch, seq), generator=generator)
    for b in range(batch):  # EOS at docs - 1 random places: about `docs` documents per row
        rows[b, torch.randperm(seq - 1, generator=generator)[: docs - 1]] = EOS
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--docs-per-row", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.hidden * 4,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         max_position_embeddings=args.seq, eos_token_id=EOS)
    config._attn_implementation = args.attention
    model = LlamaForCausalLM(config).train()
    rows = packed_rows(args.batch, args.seq, args.docs_per_row, torch.Generator().manual_seed(1))
    feeds = {"masked": Feed(EOS, True), "unmasked": Feed(EOS, False)}

    def step(feed: Feed) -> float:
        start = time.perf_counter()
        model(**feed(rows), labels=rows).loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for feed in feeds.values():  # warm-up: first calls allocate and pick kernels
        step(feed)
    times: dict[str, list[float]] = {name: [] for name in feeds}
    for _ in range(args.repeats):
        for name, feed in feeds.items():
            times[name].append(step(feed))
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["masked"] / median["unmasked"]
    with torch.no_grad():
        model.eval()
        moved = (model(**feeds["masked"](rows)).logits - model(**feeds["unmasked"](rows)).logits).abs().amax(-1)
    print(f"{args.layers} layers x {args.hidden}, seq {args.seq}, batch {args.batch}, ~{args.docs_per_row} documents "
          f"a row, {args.attention}: step {median['masked'] * 1e3:.0f} ms masked, {median['unmasked'] * 1e3:.0f} ms "
          f"unmasked (medians of {args.repeats}, interleaved): {ratio:.3f}x; largest logit change per position, "
          f"median {float(moved.median()):.3f}")
    emit([(f"step time, document masking / none ({args.attention}, seq {args.seq}, {args.docs_per_row} docs a row)",
           f"{ratio:.3f}", "", None),
          ("median largest logit change per position when masking is on", f"{float(moved.median()):.3f}", "", None)])


if __name__ == "__main__":
    main()
