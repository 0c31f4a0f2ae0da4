"""The shard stage end to end on real text: accounting, determinism, resume, rounds, verification."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.run_config import load_run_config
from launcher.rundir import RunDir
from sharding.corpus import read_corpus
from sharding.shards import Manifest, sha256_file
from sharding.stage import work_files

from .helpers import shard, shard_config, wait_finished

REASON_PREFIXES = ("read.", "normalize.", "quality.", "decontam.", "dedup.")


def stats_of(out: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((out / "stats.json").read_text())  # type: ignore[no-any-return]


def file_hashes(out: Path) -> dict[str, str]:
    """Every file of the stage folder (the dedup index's parts too), by its path inside it."""
    return {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}


def mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*"))}


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_real_text_accounting_manifest_and_verify(tmp_path: Path, corpora: dict[str, Path],
                                                  tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = shard(tmp_path, list(corpora.values()), tokenizer_dir, "shard.tasks=2")
    stats = stats_of(out)
    assert stats["docs_in"] == 1000 and stats["docs_kept"] > 500
    assert stats["docs_in"] == stats["docs_kept"] + sum(stats["dropped"].values())
    assert all(reason.startswith(REASON_PREFIXES) for reason in stats["dropped"])
    assert stats["modified"].get("pii.email", 0) > 0  # licenses name their authors' addresses
    manifest = Manifest.load(out)
    assert manifest.verify(out) == [] and len(manifest.split_shards("train")) >= 2 and manifest.split_shards("val")
    assert manifest.tokens("train") == stats["tokens"]["train"]["packed_tokens"] > 0
    assert main(["inspect", str(out), "--verify", "--decode", "1"]) == 0
    victim = out / manifest.split_shards("train")[1].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0xFF
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["inspect", str(out), "--verify"]) == 1
    printed = capsys.readouterr().out
    assert f"BAD {victim.name}: sha256 differs" in printed and "1 bad" in printed


def test_output_is_byte_identical_across_reruns_and_task_counts(tmp_path: Path, corpora: dict[str, Path],
                                                                tokenizer_dir: Path, one_task_shards: Path) -> None:
    inputs = list(corpora.values())
    one = one_task_shards  # the same inputs and config, sharded by 1 task (shared, read-only)
    three = shard(tmp_path / "three", inputs, tokenizer_dir, "shard.tasks=3")
    again = shard(tmp_path / "again", inputs, tokenizer_dir, "shard.tasks=3")
    assert file_hashes(one) == file_hashes(three) == file_hashes(again)
    before = mtimes(three)
    shard(tmp_path / "three", inputs, tokenizer_dir, "shard.tasks=3")  # finished: nothing is redone
    assert mtimes(three) == before


def test_killed_map_task_resumes_at_the_file_where_it_stopped(tmp_path: Path, corpora: dict[str, Path],
                                                              tokenizer_dir: Path) -> None:
    records = list(read_corpus(corpora["licenses"]))
    inputs = [write_jsonl(tmp_path / f"part-{i}.jsonl", records[i::8]) for i in range(8)]
    reference = shard(tmp_path / "reference", inputs, tokenizer_dir, "shard.tasks=1")
    config = shard_config(tmp_path, inputs, tokenizer_dir)
    cfg = load_run_config(config, ["shard.tasks=1", "shard.encode_batch=4"])
    run = RunDir.create(cfg)
    out = run.stage_dir("shard")
    worker = subprocess.Popen([sys.executable, "-c", (
        "import sys; from launcher.run_config import load_run_config; from sharding.stage import map_files; "
        "from pathlib import Path; cfg = load_run_config(Path(sys.argv[1]), sys.argv[3:]); "
        "map_files(cfg.shard, Path(sys.argv[2]), 0, 1)"), str(config), str(out), "shard.tasks=1",
        "shard.encode_batch=4"], start_new_session=True)
    deadline = time.monotonic() + 60
    while sum(work_files(out, i).tally.exists() for i in range(8)) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    finished = {i: work_files(out, i).tally.stat().st_mtime_ns for i in range(8) if work_files(out, i).tally.exists()}
    assert 2 <= len(finished) < 8, "the task was killed mid-way"
    assert main(["shard", str(config), "shard.tasks=1", "shard.encode_batch=4"]) == 0
    assert file_hashes(out) == file_hashes(reference)
    assert stats_of(out)["docs_in"] == len(records)


def test_second_round_adds_only_new_non_duplicate_documents(tmp_path: Path, corpora: dict[str, Path],
                                                            tokenizer_dir: Path) -> None:
    licenses = list(read_corpus(corpora["licenses"]))
    news = list(read_corpus(corpora["news"]))
    first = shard(tmp_path / "first", [write_jsonl(tmp_path / "round1.jsonl", news)], tokenizer_dir)
    assert stats_of(first)["docs_kept"] == len(news)  # so every copy below has its original in the index
    alone = shard(tmp_path / "alone", [write_jsonl(tmp_path / "licenses.jsonl", licenses)], tokenizer_dir)

    def near_copy(record: dict[str, str]) -> dict[str, str]:
        words = record["text"].split(" ")
        words[len(words) // 2] = "notwithstanding"
        return {**record, "id": record["id"] + "-edited", "text": " ".join(words)}

    repeated = news[:100] + [near_copy(r) for r in news[100:]]
    second_inputs = [write_jsonl(tmp_path / "round2.jsonl", repeated + licenses)]
    second = shard(tmp_path / "second", second_inputs, tokenizer_dir,
                   extra=("[shard.dedup]", f"previous = {json.dumps([str(first)])}"))
    stats = stats_of(second)
    assert stats["docs_kept"] == stats_of(alone)["docs_kept"], "only the new documents survive"
    assert stats["dropped"]["dedup.exact_previous_round"] > 0 and stats["dropped"]["dedup.near_previous_round"] > 0
    assert Manifest.load(second).tokens("train") + Manifest.load(second).tokens("val") == \
        Manifest.load(alone).tokens("train") + Manifest.load(alone).tokens("val")
    assert stats["docs_in"] == stats["docs_kept"] + sum(stats["dropped"].values())


def test_missing_input_and_bad_tokenizer_stop_before_any_work(tmp_path: Path, corpora: dict[str, Path],
                                                              tokenizer_dir: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    config = shard_config(tmp_path, [tmp_path / "nowhere.jsonl"], tokenizer_dir)
    assert main(["shard", str(config)]) == 2
    assert "nowhere.jsonl" in capsys.readouterr().err
    config = shard_config(tmp_path, [corpora["wiki"]], tmp_path / "no-tokenizer")
    assert main(["shard", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "tokenizer" in err and "not found" in err and err.count("\n") == 0
    config = shard_config(tmp_path, [corpora["wiki"]], tokenizer_dir, 'text_field = "body"')
    assert main(["shard", str(config)]) == 2
    assert "text field 'body' is missing from every record" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_job_arrays_and_single_steps_on_the_slurm_cluster(tmp_path: Path, corpora: dict[str, Path],
                                                          tokenizer_dir: Path, one_task_shards: Path) -> None:
    inputs = list(corpora.values())
    local = one_task_shards  # the same inputs and config, sharded by 1 local task
    (tmp_path / "slurm").mkdir()
    config = shard_config(tmp_path / "slurm", inputs, tokenizer_dir)
    # 2 cores per element: each map element cleans and tokenizes in 2 worker processes (shard.workers = 0), the
    # local run in its own process; the bytes must not tell them apart.
    assert main(["submit", str(config), "shard.tasks=3", "shard.resources.cpus_per_task=2"]) == 0
    run = RunDir(tmp_path / "slurm" / "runs" / "shard")
    entry = wait_finished(run, "shard", timeout=300)
    assert entry["status"] == "completed", entry
    buckets = load_run_config(config, ["shard.tasks=3"]).shard.dedup.buckets  # the default, as the local run's
    assert sorted(entry["tasks_done"]) == sorted(
        [f"map/element-{i}" for i in range(3)] + [f"dedup/element-{b}" for b in range(buckets)] + ["cluster/rank-0"]
        + [f"pack/element-{i}" for i in range(3)] + ["finish/rank-0"])
    # map, dedup and pack arrays, one cluster job, one finish job
    assert len({j.split("_")[0] for j in entry["job_ids"]}) == 5
    assert file_hashes(run.stage_dir("shard")) == file_hashes(local)


def test_torture_corpus_is_counted_by_name_and_never_crashes(tmp_path: Path, corpora: dict[str, Path],
                                                             tokenizer_dir: Path) -> None:
    from tests.torture import write_torture_corpus

    expect = write_torture_corpus(tmp_path / "torture")
    out = shard(tmp_path / "run", [tmp_path / "torture", corpora["wiki"]], tokenizer_dir, "shard.tasks=2")
    stats = stats_of(out)
    assert stats["docs_in"] == expect["docs_in"] + 400
    assert stats["docs_in"] == stats["docs_kept"] + sum(stats["dropped"].values())
    for key, count in expect.items():
        if key.startswith("read."):
            assert stats["dropped"].get(key) == count, key
        elif key.startswith("files."):
            assert stats["files"].get(key.removeprefix("files.")) == count, key
    assert stats["samples"]["read.malformed_json"][0].startswith(str(tmp_path / "torture"))
    assert Manifest.load(out).verify(out) == []
