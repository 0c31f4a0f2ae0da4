"""The shard stage, step one: a job array maps input files to cleaned, tokenized work files and the bucketed
dedup keys (`sharding.buckets`); the steps after it are in `sharding.reduce`.

Every step is a pure function of (config, rank, world size): the map's units (input files, large ones split into
pieces: `sharding.units`) are shared among the map elements by their sizes (`assign_by_size`), work files are
named by unit, and everything later steps write depends only on the global document order, so the output is
byte-identical for any number of tasks or buckets. Each unit's tally is written last, after its work files: it is
the unit's completion marker, and a requeued task starts again at the first unit without one.

The stage folder is bound to its inputs: the first task to start records the expanded input list
(path, size, mtime_ns, in order) in inputs.json, and every later map attempt, the cluster step and a rerun
of the finished stage compare the current expansion with it and refuse any difference by name.
Each tally names the input it was made from, so the cluster step checks work files against that list too.
"""

from __future__ import annotations

import heapq
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from common.publish import commit_file, publish_json, publish_json_once, temp_path
from sharding.buckets import UnitWriter
from sharding.config import ShardConfig
from sharding.dedup_index import Previous
from sharding.documents import Tally
from sharding.map_workers import MapEncoder
from sharding.readers import InputError, expand_inputs, preflight, read_file
from sharding.tokenize import load_tokenizer
from sharding.units import Unit, plan_units, unit_source

COMPLETE = "COMPLETE"
WORK = "work"
INPUTS = "inputs.json"  # the input files the stage folder is bound to, recorded at first use
INPUTS_VERSION = 1
_SHOWN = 3  # paths named per kind of change in an InputsChanged message


class InputsChanged(InputError):
    """The inputs expand differently from the list the stage folder recorded when it was first used."""


TOKENS_SCHEMA = pa.schema([("record", pa.int64()), ("val", pa.bool_()), ("tokens", pa.large_list(pa.uint32()))])


@dataclass(frozen=True)
class UnitFiles:
    """The work files of one unit (an input file, or a piece of one); the tally is written last and marks the
    others complete."""
    exact: Path  # exact-hash entries, runs of one batch per bucket
    bands: Path  # MinHash band entries, same layout
    sigs: Path  # raw uint32 signatures, one row per surviving document
    tokens: Path  # record, val and tokens of every surviving document, in order
    tally: Path  # the unit's tally, its source and its row and token counts


def work_files(out: Path, index: int) -> UnitFiles:
    stem = out / WORK / f"{index:06d}"
    return UnitFiles(*(stem.with_suffix(s) for s in (".exact.arrow", ".bands.arrow", ".sigs.u32", ".tokens.arrow",
                                                       ".tally.json")))


def check_inputs(cfg: ShardConfig, out: Path | None = None) -> None:
    """Everything that would stop the stage, checked before any job is submitted; with the stage folder `out`,
    also that the inputs still match the list it recorded (`check_recorded_inputs`)."""
    if not cfg.inputs:
        raise ValueError("shard.inputs is empty: give files, folders or globs of the corpus")
    files = expand_inputs(cfg.inputs)
    if out is not None:
        check_recorded_inputs(cfg, out, files)
    preflight(files, cfg.reader)
    load_tokenizer(cfg.tokenizer, cfg.eos_token)


# --- the inputs a stage folder is bound to ---------------------------------------------------------------------------

def stat_inputs(files: Sequence[Path]) -> list[dict[str, Any]]:
    """[{path, size, mtime_ns}] of the input files, in their order: one stat each, contents never read."""
    listing = []
    for path in files:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise InputError(f"input '{path}' disappeared while the inputs were listed") from None
        listing.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return listing


def _read_recorded(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    if data.get("version") != INPUTS_VERSION:
        raise ValueError(f"{path}: unknown inputs list version {data.get('version')!r}")
    return data["files"]  # type: ignore[no-any-return]


def _listed(kind: str, paths: list[str]) -> str:
    more = f", ... ({len(paths) - _SHOWN} more)" if len(paths) > _SHOWN else ""
    return f"{len(paths)} {kind} ({', '.join(paths[:_SHOWN])}{more})"


def input_changes(recorded: list[dict[str, Any]], current: list[dict[str, Any]]) -> str:
    """What differs between two input lists, as one line ("" when they are equal): per kind of change its
    count and first few paths. A rename is a removal and an addition."""
    if recorded == current:
        return ""
    old, new = {e["path"]: e for e in recorded}, {e["path"]: e for e in current}
    both = [p for p in new if p in old]
    kinds = {
        "added": [p for p in new if p not in old],
        "removed": [p for p in old if p not in new],
        "resized": [f"{p} {old[p]['size']} -> {new[p]['size']} bytes" for p in both
                    if old[p]["size"] != new[p]["size"]],
        "modified": [p for p in both if old[p]["size"] == new[p]["size"] and old[p]["mtime_ns"] != new[p]["mtime_ns"]],
    }
    return "; ".join(_listed(kind, paths) for kind, paths in kinds.items() if paths) or \
        "the same files in another order"


def _changed(out: Path, recorded: list[dict[str, Any]], changes: str) -> InputsChanged:
    return InputsChanged(
        f"the shard inputs differ from the {len(recorded)} files recorded in {out / INPUTS} when this run's shard "
        f"stage started: {changes}. A run is bound to the inputs it started with; to ingest new data, start a new "
        f"run (another run.name) whose shard.dedup.previous lists \"{out}\" (its documents are deduplicated "
        f"against this run's), or delete {out} to redo this run from scratch")


def record_inputs(out: Path, patterns: Sequence[str], current: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input list of the stage folder `out`: `current` (from `stat_inputs`) is recorded if none is yet,
    the first writer winning a race (`publish_json_once`); raises InputsChanged when the recorded list differs."""
    path = out / INPUTS
    if not path.exists():
        publish_json_once(path, {"version": INPUTS_VERSION, "patterns": list(patterns), "files": current})
    recorded = _read_recorded(path)
    if changes := input_changes(recorded, current):
        raise _changed(out, recorded, changes)
    return recorded


def bind_inputs(cfg: ShardConfig, out: Path,
                own: Callable[[list[dict[str, Any]]], Sequence[int]] | None = None) -> list[dict[str, Any]]:
    """Expand the inputs now, record them at first use, and return the recorded list (or refuse a change).

    With `own` (a map element: which file indexes of the recorded list are its own), once the list is recorded
    only the element's own files are stat'ed, after the expanded paths are compared whole: the binding adds
    N/world metadata calls to an element's expansion of the inputs, not N (benchmarks/input_binding.py). The
    reduce, the one task that reads every file, checks them all.
    """
    files = expand_inputs(cfg.inputs)
    if own is None or not (out / INPUTS).exists():
        return record_inputs(out, cfg.inputs, stat_inputs(files))
    recorded = _read_recorded(out / INPUTS)
    if [str(p) for p in files] != [e["path"] for e in recorded]:
        raise _changed(out, recorded, input_changes(recorded, stat_inputs(files)))
    mine = own(recorded)
    if changes := input_changes([recorded[i] for i in mine], stat_inputs([files[i] for i in mine])):
        raise _changed(out, recorded, changes)
    return recorded


def assign_by_size(sizes: Sequence[int], world: int) -> list[list[int]]:
    """The input files of each of `world` map elements, balanced by bytes: largest file first (ties: the earlier),
    each to the element with the fewest bytes so far (then the fewest files, then the lowest rank); each element's
    files in input order. A pure function of the recorded sizes: every element computes the same split. An element
    takes at most the mean plus its largest file (files are not split), where file i % world could leave one with
    several of the largest."""
    loads = [(0, 0, rank) for rank in range(world)]  # (bytes, files, rank): a heap, least loaded first
    shares: list[list[int]] = [[] for _ in range(world)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        size, count, rank = heapq.heappop(loads)
        shares[rank].append(index)
        heapq.heappush(loads, (size + sizes[index], count + 1, rank))
    return [sorted(share) for share in shares]


class _Share:
    """Map element `rank`'s units of the recorded list, and their files, planned once (the binding and the map loop
    both ask)."""

    def __init__(self, rank: int, world: int, split_mb: float) -> None:
        self.rank, self.world, self.split_mb = rank, world, split_mb
        self._units: list[Unit] = []
        self._mine: list[int] = []

    def units(self, recorded: list[dict[str, Any]]) -> tuple[list[Unit], list[int]]:
        """(every unit, the indexes of this element's)."""
        if not self._units:
            self._units = plan_units(recorded, self.split_mb)
            self._mine = assign_by_size([u.size for u in self._units], self.world)[self.rank]
        return self._units, self._mine

    def files(self, recorded: list[dict[str, Any]]) -> list[int]:
        units, mine = self.units(recorded)
        return sorted({units[u].file for u in mine})


def check_recorded_inputs(cfg: ShardConfig, out: Path, files: Sequence[Path] | None = None) -> None:
    """Raise InputsChanged when the stage folder `out` has recorded inputs and `cfg.inputs` (or the already
    expanded `files`) no longer match them; nothing is written. For a completed stage's rerun and the preflight."""
    path = out / INPUTS
    if not path.exists():
        return  # not started yet (or made before inputs were recorded): nothing to compare with
    recorded = _read_recorded(path)
    if changes := input_changes(recorded, stat_inputs(expand_inputs(cfg.inputs) if files is None else files)):
        raise _changed(out, recorded, changes)


def read_tally(out: Path, index: int) -> dict[str, Any] | None:
    """Unit `index`'s tally (its work files' completion marker); None when it is not finished."""
    try:
        return json.loads(work_files(out, index).tally.read_text())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None


def tally_source(out: Path, index: int) -> Any:
    """The input a finished unit was made from (its tally's "source", `unit_source`); None when not finished."""
    tally = read_tally(out, index)
    return None if tally is None else tally.get("source")


class _Progress:
    """A log line every `every` seconds: progress bars do not survive Slurm log files."""

    def __init__(self, label: str, every: float = 10.0) -> None:
        self.label, self.every = label, every
        self.start = self.last = time.monotonic()
        self.docs = self.chars = 0

    def add(self, docs: int, chars: int, where: str) -> None:
        self.docs += docs
        self.chars += chars
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.report(where)

    def report(self, where: str) -> None:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        print(f"[{self.label}] {where}: {self.docs} docs, {self.docs / elapsed:.0f} docs/s, "
              f"{self.chars / elapsed / 1e6:.2f} MB/s", flush=True)


def map_files(cfg: ShardConfig, out: Path, rank: int, world: int) -> dict[str, Any]:
    """Array element `rank` of `world`: clean, hash and tokenize its share of the units (`assign_by_size`)."""
    if (out / COMPLETE).exists():
        check_recorded_inputs(cfg, out)  # a finished stage whose inputs changed since must not look current
        return {"skipped": "stage already complete"}
    (out / WORK).mkdir(parents=True, exist_ok=True)
    share = _Share(rank, world, cfg.split_mb)
    try:
        recorded = bind_inputs(cfg, out, own=share.files)
    except InputsChanged as e:
        raise InputsChanged(f"{e}. Map task {rank}/{world} stopped before reading any input: this attempt "
                            "wrote no work file") from None
    # Earlier rounds' index: this element's share of its parts checked before any work is done on it.
    Previous.load([Path(p) for p in cfg.dedup.previous], cfg.dedup.minhash).verify(out / WORK, rank, world)
    threads = cfg.threads or cfg.resources.cpus_per_task
    encoder = MapEncoder(cfg, cfg.workers or cfg.resources.cpus_per_task, threads)
    progress = _Progress(f"map {rank}/{world}")
    done = 0
    units, mine = share.units(recorded)
    try:
        for index in mine:
            if tally_source(out, index) == unit_source(recorded[units[index].file], units[index].piece):
                continue  # finished by an earlier attempt, from this very file (and piece)
            _map_unit(recorded[units[index].file], units[index], index, cfg=cfg, out=out, encoder=encoder,
                      progress=progress)
            done += 1
    finally:
        encoder.close()
    progress.report(f"{done} units" + (f", {encoder.workers} worker processes" if encoder.workers > 1 else ""))
    return {"units": done}


def _map_unit(entry: dict[str, Any], unit: Unit, index: int, *, cfg: ShardConfig, out: Path, encoder: MapEncoder,
              progress: _Progress) -> None:
    """Unit `index` (`unit` of the input file `entry`, its recorded {path, size, mtime_ns}) to its work files, then
    its tally, the unit's completion marker, which names its source (`unit_source`)."""
    path = Path(entry["path"])
    files = work_files(out, index)
    tally = Tally()
    dedup = UnitWriter((files.exact, files.bands, files.sigs), cfg.dedup.minhash, cfg.dedup.buckets)
    tokens_tmp = temp_path(files.tokens)  # pyarrow writes it by name
    sink = pa.OSFile(str(tokens_tmp), "wb")
    writer = pa.ipc.new_file(sink, TOKENS_SCHEMA, options=pa.ipc.IpcWriteOptions(compression="zstd"))
    token_count = 0
    try:
        for done in encoder.run(read_file(path, unit.file, cfg.reader, tally, unit.piece), path, tally,
                                unit.piece.split):
            exact, sigs, batch = done.encoded
            dedup.add(exact, sigs)
            writer.write_batch(batch)
            token_count += len(batch.column("tokens").values)
            progress.add(done.docs, done.chars, path.name)
    except BaseException:
        dedup.abandon()
        sink.close()
        tokens_tmp.unlink(missing_ok=True)
        raise
    rows = dedup.close()
    writer.close()
    sink.close()
    commit_file(tokens_tmp, files.tokens)
    if changes := input_changes([entry], stat_inputs([path])):
        raise InputsChanged(f"input {unit.file} changed while it was read ({changes}); its tally is not written")
    counts = {"rows": rows, "tokens": token_count, "buckets": cfg.dedup.buckets}
    publish_json(files.tally, {**tally.state_dict(), "source": unit_source(entry, unit.piece), "unit": counts})


