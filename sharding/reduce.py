"""The shard stage after the map: dedup (an array over buckets) -> cluster (one task) -> pack (an array over
tasks) -> finish (one task). Each element's output is published whole and marks it done, so a requeued or
rerun element skips what an earlier attempt finished, and a time-out loses only that element's work.

- dedup, element b: bucket b's exact and band entries of every map unit and of earlier rounds' indexes (whose
  parts the map elements checked), the LSH candidates verified on their signatures; writes
  work/bucket-<b>-of-<buckets>-<earlier rounds>.pairs.npz.
- cluster: the pairs of every bucket -> union-find over the pairs only -> the drop list (work/drops.npy, sorted
  by key: each pack task reads its files' slice), the dedup tally, and the packing groups; cluster.json last.
- pack, element t: packing groups g with g % tasks == t -> shards named by group, and the dedup index parts of
  their units (the kept documents' entries); work/pack-<g>.json last.
- finish: the manifest as the concatenation of the groups' shards, index.json, stats.json, COMPLETE.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from common.publish import commit_file, publish_bytes, publish_json, remove_stale_temps, temp_path
from sharding.buckets import PAIRS, KeySpace, bucket_pairs, concat, file_buckets, read_bucket
from sharding.cluster import cluster, dedup_tally, pack_groups, unit_drops
from sharding.config import ShardConfig
from sharding.dedup_index import INDEX_DIR, Part, Previous, file_entry, write_index
from sharding.documents import Tally
from sharding.packing import pack_group
from sharding.readers import location
from sharding.shards import Manifest, ShardInfo, token_dtype
from sharding.stage import COMPLETE, WORK, bind_inputs, check_recorded_inputs, read_tally, work_files
from sharding.tokenize import load_tokenizer
from sharding.units import Unit, plan_units, unit_source

CLUSTER = "cluster.json"
DROPS = "drops.npy"  # (key, rep, reason) of every dropped document of this round, by key
DROP_KEYS = "drop-keys.npy"  # the keys alone, contiguous: a pack task memory-maps it and reads its files' slice
DROPS_DTYPE = np.dtype([("key", "<u8"), ("rep", "<u8"), ("reason", "u1")])


def _recorded(out: Path) -> list[dict[str, Any]]:
    return json.loads((out / "inputs.json").read_text())["files"]  # type: ignore[no-any-return]


def _named(recorded: list[dict[str, Any]], unit: Unit) -> str:
    """A unit as error messages name it: its file, and which piece when the file is split."""
    piece = unit.piece
    return str(recorded[unit.file]["path"]) + (f" (piece {piece.index + 1} of {piece.count})" if piece.split else "")


def _bucket_path(out: Path, bucket: int, buckets: int, previous: Previous) -> Path:
    """Named by the bucket count and the earlier rounds read too: a rerun with another shard.dedup.buckets or
    other earlier rounds never mixes in old pairs (the map's files are read with any multiple of the count they
    were written with)."""
    return out / WORK / f"bucket-{bucket:05d}-of-{buckets:05d}-{previous.identity[:16] or 'none'}.pairs.npz"


def _pack_path(out: Path, group: int) -> Path:
    return out / WORK / f"pack-{group:05d}.json"


class Signatures:
    """Signatures by key: this round's from the map's raw files, earlier rounds' from their index parts."""

    def __init__(self, out: Path, space: KeySpace, previous: Previous, num_perm: int) -> None:
        self.out, self.space, self.previous, self.num_perm = out, space, previous, num_perm

    def _memmap(self, path: Path, dtype: str) -> np.ndarray:
        return np.memmap(path, dtype, "r") if path.stat().st_size else np.empty(0, dtype)

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        """(len(keys), num_perm) uint32 for sorted unique keys."""
        sigs = np.empty((len(keys), self.num_perm), np.uint32)
        new = keys >= np.uint64(self.space.base)
        idx = np.flatnonzero(new)
        units, rows = self.space.unit_of(keys[idx]), self.space.row_of(keys[idx])
        for unit in np.unique(units):
            mine = units == unit
            table = self._memmap(work_files(self.out, int(unit)).sigs, "<u4").reshape(-1, self.num_perm)
            sigs[idx[mine]] = table[rows[mine]]
        idx = np.flatnonzero(~new)
        part_of = np.searchsorted(self.previous.starts(), keys[idx], side="right") - 1
        for p in np.unique(part_of):
            part, mine = self.previous.parts[int(p)], idx[part_of == p]
            stored = self._memmap(part.path("keys"), "<u8")
            wanted = keys[mine] - np.uint64(part.key_offset)
            rows = np.searchsorted(stored, wanted)
            if (rows >= len(stored)).any() or (stored[np.minimum(rows, len(stored) - 1)] != wanted).any():
                raise ValueError(f"{part.path('keys')}: a key of its bucket entries has no signature; the index "
                                 "is damaged")
            sigs[mine] = self._memmap(part.path("sigs"), "<u4").reshape(-1, self.num_perm)[rows]
        return sigs


def dedup_bucket(cfg: ShardConfig, out: Path, bucket: int) -> dict[str, Any]:
    """Dedup element `bucket`: its share of the exact and near duplicate pairs."""
    if (out / COMPLETE).exists():
        return {"skipped": "stage already complete"}
    previous = Previous.load([Path(p) for p in cfg.dedup.previous], cfg.dedup.minhash)
    path = _bucket_path(out, bucket, cfg.dedup.buckets, previous)
    if path.exists():
        return {"skipped": "bucket already done"}
    if unchecked := previous.unverified(out / WORK):  # the map elements check every earlier part's XXH3
        raise RuntimeError(f"dedup bucket {bucket}: {len(unchecked)} parts of the earlier rounds' index were not "
                           "checked by the map (an attempt of an older stillroom?); rerun the stage")
    recorded, buckets = _recorded(out), cfg.dedup.buckets
    units = plan_units(recorded, cfg.split_mb)
    space = KeySpace(previous.base, len(units))
    missing = [i for i in range(len(units)) if not work_files(out, i).tally.exists()]
    if missing:
        raise RuntimeError(f"dedup bucket {bucket}: the map has not finished {len(missing)} of {len(units)} units "
                           f"(first: {_named(recorded, units[missing[0]])}); rerun the stage")
    exact = [read_bucket(work_files(out, i).exact, bucket, buckets, space.offset(i)) for i in range(len(units))]
    bands = [read_bucket(work_files(out, i).bands, bucket, buckets, space.offset(i)) for i in range(len(units))]
    exact += [read_bucket(p.path("exact"), bucket, buckets, p.key_offset) for p in previous.parts]
    bands += [read_bucket(p.path("bands"), bucket, buckets, p.key_offset) for p in previous.parts]
    signatures = Signatures(out, space, previous, cfg.dedup.minhash.num_perm)
    exact_out, near_out = bucket_pairs(cfg.dedup, concat(exact), concat(bands), signatures, space.base)
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        np.savez(f, exact=exact_out, near=near_out)
    commit_file(tmp, path)
    return {"exact_pairs": len(exact_out), "near_pairs": len(near_out)}


def cluster_pairs(cfg: ShardConfig, out: Path) -> dict[str, Any]:
    """The one task between dedup and pack: the drop list, the dedup tally and the packing groups."""
    if (out / COMPLETE).exists():
        check_recorded_inputs(cfg, out)  # a finished stage whose inputs changed since must not look current
        return {"skipped": "stage already complete"}
    if (out / WORK / CLUSTER).exists():
        return {"skipped": "already clustered"}
    recorded = bind_inputs(cfg, out)  # the one check of every input after the map: the current expansion must match
    plan = plan_units(recorded, cfg.split_mb)
    tallies = [read_tally(out, i) for i in range(len(plan))]  # each read once: the check and the counts
    missing = [i for i, (tally, unit) in enumerate(zip(tallies, plan, strict=True))
               if tally is None or tally.get("source") != unit_source(recorded[unit.file], unit.piece)]
    if missing:
        raise RuntimeError(f"the map step has not finished {len(missing)} of {len(plan)} units "
                           f"(first: {_named(recorded, plan[missing[0]])}; a tally made from another file or piece "
                           "counts as unfinished); rerun the stage")
    units = [tally["unit"] for tally in tallies if tally is not None]
    previous = Previous.load([Path(p) for p in cfg.dedup.previous], cfg.dedup.minhash)
    paths = [_bucket_path(out, b, cfg.dedup.buckets, previous) for b in range(cfg.dedup.buckets)]
    if absent := [b for b, path in enumerate(paths) if not path.exists()]:
        raise RuntimeError(f"dedup buckets {absent[:5]} ({len(absent)} of {cfg.dedup.buckets}) are not done; "
                           "rerun the stage")
    exact, near = [], []
    for path in paths:
        with np.load(path) as pairs:
            exact.append(pairs["exact"])
            near.append(pairs["near"])
    space = KeySpace(previous.base, len(plan))
    drops = cluster(np.concatenate(exact) if exact else np.empty(0, PAIRS),
                    np.concatenate(near) if near else np.empty(0, PAIRS), space.base)
    table = np.empty(len(drops[0]), DROPS_DTYPE)
    table["key"], table["rep"], table["reason"] = drops
    for name, data in ((DROPS, table), (DROP_KEYS, drops[0])):
        tmp = temp_path(out / WORK / name)
        with open(tmp, "wb") as f:
            np.save(f, data)
        commit_file(tmp, out / WORK / name)
    paths = [Path(e["path"]) for e in recorded]
    tally = dedup_tally(table, space, lambda u, record: location(paths[plan[u].file], record, plan[u].piece.split),
                        lambda u: work_files(out, u).tokens)
    groups = pack_groups([u["tokens"] for u in units], cfg.pack_shards * cfg.shard_sequences * cfg.seq_len)
    publish_json(out / WORK / CLUSTER, {"groups": groups, "base": space.base, "units": len(plan),
                                        "tally": tally.state_dict()})
    return {"dropped": len(table), "groups": len(groups)}


def _index_part(out: Path, unit: int, space: KeySpace, keep: np.ndarray, num_perm: int) -> Part:
    """The kept documents' entries and signatures of one unit, as a part of this folder's index."""
    files = work_files(out, unit)
    folder = out / INDEX_DIR
    folder.mkdir(exist_ok=True)
    offset = np.uint64(space.offset(unit))
    targets = {}
    for kind, source in (("exact", files.exact), ("bands", files.bands)):
        target = folder / f"{unit:06d}.{kind}.arrow"
        tmp = temp_path(target)
        with pa.memory_map(str(source), "r") as src, pa.OSFile(str(tmp), "wb") as sink:
            reader = pa.ipc.open_file(src)
            with pa.ipc.new_file(sink, reader.schema) as writer:
                for b in range(reader.num_record_batches):  # run by run, bucket by bucket: the layout is kept
                    batch = reader.get_batch(b)
                    rows = batch.column("key").to_numpy()
                    batch = batch.filter(pa.array(keep[rows])) if len(rows) else batch
                    keys = pa.array(batch.column("key").to_numpy() + offset)
                    writer.write_batch(batch.set_column(batch.schema.get_field_index("key"), "key", keys))
        commit_file(tmp, target)
        targets[kind] = target
    kept = np.flatnonzero(keep)
    sigs = np.memmap(files.sigs, "<u4", "r").reshape(-1, num_perm) if len(keep) else np.empty((0, num_perm), "<u4")
    for kind, data in (("keys", kept.astype("<u8") + offset), ("sigs", np.ascontiguousarray(sigs[kept]))):
        targets[kind] = folder / f"{unit:06d}.{kind}.{'u64' if kind == 'keys' else 'u32'}"
        publish_bytes(targets[kind], data.tobytes())
    key_min, key_max = (int(kept[0]) + int(offset), int(kept[-1]) + int(offset)) if len(kept) else (0, 0)
    return Part(out, {k: file_entry(p, out) for k, p in targets.items()}, 0, key_min, key_max,
                file_buckets(files.exact))  # the count the map wrote with, whatever the config says now


def _plan(out: Path) -> dict[str, Any]:
    """cluster.json: the packing groups, the key base and the dedup tally; a clear error before the cluster ran."""
    try:
        return json.loads((out / WORK / CLUSTER).read_text())  # type: ignore[no-any-return]
    except FileNotFoundError:
        raise RuntimeError(f"the shard stage's cluster step has not finished ({out / WORK / CLUSTER} is missing); "
                           "rerun the stage") from None


def _unit_count(plan: dict[str, Any], out: Path) -> int:
    """The map's units, as the cluster step counted them; a cluster.json of a stillroom that mapped whole files
    only (no "units") has one per input file."""
    return int(plan["units"]) if "units" in plan else len(_recorded(out))


def pack_step(cfg: ShardConfig, out: Path, rank: int, world: int) -> dict[str, Any]:
    """Pack element `rank` of `world`: every packing group g with g % world == rank."""
    if (out / COMPLETE).exists():
        return {"skipped": "stage already complete"}
    plan = _plan(out)
    space = KeySpace(plan["base"], _unit_count(plan, out))
    _, info = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    drop_keys = np.load(out / WORK / DROP_KEYS, mmap_mode="r")  # a strided view would be copied whole
    done = 0
    for group in range(rank, len(plan["groups"]), world):
        if _pack_path(out, group).exists():
            continue
        units, parts = [], []
        for unit in plan["groups"][group]:
            rows = json.loads(work_files(out, unit).tally.read_text())["unit"]["rows"]
            keep = np.ones(rows, bool)
            keep[unit_drops(drop_keys, space, unit)] = False
            units.append((work_files(out, unit).tokens, keep))
            if keep.any():  # a unit with no kept document has no index part: parts' key ranges stay ascending
                parts.append(_index_part(out, unit, space, keep, cfg.dedup.minhash.num_perm))
        packed = pack_group(cfg, out, group, units, info.eos_id, token_dtype(info.id_bound))
        publish_json(_pack_path(out, group), {**packed, "parts": [p.to_json(0, out) for p in parts],
                                              "kept": int(sum(int(k.sum()) for _, k in units))})
        done += 1
    return {"groups": done}


def finish(cfg: ShardConfig, out: Path, data_hash: str) -> dict[str, Any]:
    """The last task: the manifest (the groups' shards, concatenated in group order), the index, the stats."""
    if (out / COMPLETE).exists():
        check_recorded_inputs(cfg, out)  # the finished stage's inputs changed since: not a silent success
        return json.loads((out / "stats.json").read_text())  # type: ignore[no-any-return]
    plan = _plan(out)
    absent = [g for g in range(len(plan["groups"])) if not _pack_path(out, g).exists()]
    if absent:
        raise RuntimeError(f"packing groups {absent[:5]} ({len(absent)} of {len(plan['groups'])}) are not done; "
                           "rerun the stage")
    recorded = _recorded(out)
    tally = Tally.from_state_dict(plan["tally"])
    for i in range(_unit_count(plan, out)):
        tally.merge(Tally.from_state_dict(json.loads(work_files(out, i).tally.read_text())))
    packs = [json.loads(_pack_path(out, g).read_text()) for g in range(len(plan["groups"]))]
    tally.docs_kept = sum(p["kept"] for p in packs)
    shards = tuple(ShardInfo(**s) for p in packs for s in p["shards"])
    splits = ("train", "val")
    tokens = {s: {k: sum(p["tokens"][s][k] for p in packs) for k in packs[0]["tokens"][s]} if packs else {}
              for s in splits}

    def accounting() -> str:  # the summary table's document rows, on one line for state.json and the CLI
        dropped = ", ".join(f"{reason} {count:,}" for reason, count in tally.dropped.most_common())
        return (f"{tally.docs_in:,} documents read from {len(recorded)} file(s), {tally.docs_kept:,} kept"
                + (f"; dropped: {dropped}" if dropped else ""))

    # An empty output would be published as COMPLETE and fail only in the stage that reads it, hours later.
    if tally.docs_kept == 0:
        raise RuntimeError(f"shard: no document survived cleaning and deduplication ({accounting()}); "
                           "check shard.inputs and shard.reader.text_field, or loosen shard.clean")
    for split in splits if cfg.val_fraction > 0 else ("train",):
        if not any(s.split == split for s in shards):
            held = f"{tokens[split]['docs']:,} documents, {tokens[split]['doc_tokens']:,} tokens"
            hint = "raise shard.val_fraction or lower shard.seq_len" if split == "val" else "lower shard.seq_len"
            raise RuntimeError(f"shard: the {split} split is empty ({held}: not one sequence of seq_len "
                               f"{cfg.seq_len}) in any packing group; {hint} ({accounting()})")
    if tally.docs_in != tally.docs_kept + sum(tally.dropped.values()):
        raise AssertionError(f"document accounting is off: {tally.docs_in} read, {tally.docs_kept} kept, "
                             f"{sum(tally.dropped.values())} dropped")
    _, info = load_tokenizer(cfg.tokenizer, cfg.eos_token)
    previous = Previous.load([Path(p) for p in cfg.dedup.previous], cfg.dedup.minhash)
    own = [Part(out, p["files"], 0, p["key_min"], p["key_max"], p["buckets"]) for pack in packs for p in pack["parts"]]
    index = write_index(out, own, previous, KeySpace(plan["base"], _unit_count(plan, out)).end, cfg.dedup.minhash)
    manifest = Manifest(seq_len=cfg.seq_len, dtype=token_dtype(info.id_bound).name, tokenizer_sha256=info.sha256,
                        tokenizer_path=info.path, eos_id=info.eos_id, config_sha256=data_hash, shards=shards,
                        extra={"docs": {s: tokens[s]["docs"] for s in splits},
                               "previous_rounds": list(cfg.dedup.previous)}, dedup_index=index)
    stats = {**tally.state_dict(), "tokens": tokens, "dropped_total": sum(tally.dropped.values())}
    remove_stale_temps(out)  # every other element is done: what is left are killed attempts' temps
    remove_stale_temps(out / INDEX_DIR)
    publish_json(out / "stats.json", stats)
    manifest.save(out)
    publish_bytes(out / COMPLETE, f"{manifest.sha256()}\n".encode())
    shutil.rmtree(out / WORK, ignore_errors=True)  # the shards hold everything now; work files double the disk
    return stats


def run_all(cfg: ShardConfig, out: Path, data_hash: str) -> dict[str, Any]:
    """Every step of the stage in this process, in order (tests, benchmarks): what the launcher runs as jobs."""
    from sharding.stage import map_files

    for rank in range(cfg.tasks):
        map_files(cfg, out, rank, cfg.tasks)
    for bucket in range(cfg.dedup.buckets):
        dedup_bucket(cfg, out, bucket)
    cluster_pairs(cfg, out)
    for rank in range(cfg.tasks):
        pack_step(cfg, out, rank, cfg.tasks)
    return finish(cfg, out, data_hash)

