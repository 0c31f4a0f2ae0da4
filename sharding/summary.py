"""Human summaries of a finished shard folder (the stage's end and `stillroom inspect`)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Group
from rich.table import Table

from sharding.shards import Manifest


def summary_table(folder: Path) -> Group:
    stats = json.loads((folder / "stats.json").read_text())
    manifest = Manifest.load(folder)
    docs = Table(title=f"shard: {folder}", title_justify="left")
    docs.add_column("documents")
    docs.add_column("count", justify="right")
    docs.add_column("share", justify="right")
    total = max(stats["docs_in"], 1)
    docs.add_row("read", f"{stats['docs_in']:,}", "100%")
    docs.add_row("[green]kept[/]", f"{stats['docs_kept']:,}", f"{stats['docs_kept'] / total:.1%}")
    for reason, count in sorted(stats["dropped"].items(), key=lambda kv: -kv[1]):
        docs.add_row(f"  dropped: {reason}", f"{count:,}", f"{count / total:.1%}")
    for event, count in sorted(stats["files"].items()):
        docs.add_row(f"  files: {event}", f"{count:,}", "")
    for edit, count in sorted(stats["modified"].items()):
        docs.add_row(f"  edited: {edit}", f"{count:,}", "")
    shards = Table(title=f"tokens (seq_len {manifest.seq_len}, {manifest.dtype}, "
                         f"tokenizer {manifest.tokenizer_sha256[:12]})", title_justify="left")
    for column in ("split", "docs", "doc tokens", "packed tokens", "sequences", "shards", "MB on disk"):
        shards.add_column(column, justify="right")
    for split, counts in stats["tokens"].items():
        files = manifest.split_shards(split)
        shards.add_row(split, f"{counts['docs']:,}", f"{counts['doc_tokens']:,}", f"{counts['packed_tokens']:,}",
                       f"{sum(s.rows for s in files):,}", str(len(files)), f"{sum(s.bytes for s in files) / 1e6:.1f}")
    return Group(docs, shards)


def decode_sequences(folder: Path, count: int, tokenizer_path: str = "", split: str = "train") -> list[str]:
    """The first `count` packed sequences of `split`, decoded with the manifest's tokenizer."""
    from sharding.shard_reader import open_shard
    from sharding.tokenize import TokenizerError, load_tokenizer

    if count == 0:  # `inspect` without --decode: a tokenizer moved since must not fail it
        return []
    manifest = Manifest.load(folder)
    tokenizer, info = load_tokenizer(tokenizer_path or manifest.tokenizer_path)
    if info.sha256 != manifest.tokenizer_sha256:
        raise TokenizerError(f"tokenizer {info.path} is not the one these shards were made with "
                             f"(sha256 {info.sha256[:12]} vs {manifest.tokenizer_sha256[:12]})")
    texts: list[str] = []
    for shard in manifest.split_shards(split):
        reader = open_shard(folder, shard, manifest.seq_len)  # checked as training reads it
        for row in reader:
            if len(texts) == count:
                return texts
            texts.append(tokenizer.decode(row.tolist(), skip_special_tokens=False))
    return texts
