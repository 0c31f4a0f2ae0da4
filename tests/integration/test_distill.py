"""The distill stage with real DeepSpeed engines in 2 processes: a 2-layer student from a 4-layer teacher."""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from launcher.cli import main
from launcher.run_config import load_run_config
from launcher.rundir import RunDir
from tests.conftest import free_port
from training.stop import REQUEUE_EXIT_CODE

from .helpers import (
    DISTILL_REFERENCE,
    Reference,
    bitwise_equal,
    losses,
    records,
    run_dir,
    run_trainer,
    shard,
    train_config,
    wait_finished,
    wait_for_step,
    weights,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sharded_teacher", [False, True])
def test_zero3_distillation_of_a_student_from_teacher_layers(tmp_path: Path, shards: Path, teacher_model: Path,
                                                             sharded_teacher: bool,
                                                             request: pytest.FixtureRequest) -> None:
    if not sharded_teacher:  # the shared reference run is this very run
        reference: Reference = request.getfixturevalue("distill_reference")
        assert not reference.config.teacher_zero3
        out = reference.run_dir
    else:
        config = train_config(tmp_path, "distill", shards, teacher_model)
        assert main(["run", str(config), *DISTILL_REFERENCE, "distill.teacher_zero3=true"]) == 0
        out = run_dir(tmp_path, "distill")
    student = json.loads((out / "distill" / "student-init" / "student.json").read_text())
    assert student["kept_layers"] == [0, 3] and student["params_student"] < student["params_teacher"]
    evals = records(out, "distill", "eval")
    assert evals[0].get("base") and evals[-1]["domain_loss"] < evals[0]["domain_loss"]
    export = out / "distill" / "export"
    provenance = json.loads((export / "provenance.json").read_text())
    assert provenance["objective"] == "distill" and provenance["teacher"] == str(teacher_model)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.num_hidden_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.generate(**tokenizer("The licensee", return_tensors="pt"), max_new_tokens=4,
                          do_sample=False).shape[1] > 2


def test_interrupted_distillation_resumes_bitwise(tmp_path: Path, shards: Path, teacher_model: Path,
                                                  distill_reference: Reference) -> None:
    # The reference: the same config (steps, seeds, 2 ranks, ZeRO-3, log_every, eval.every), uninterrupted.
    overrides = list(distill_reference.overrides)
    config = train_config(tmp_path / "interrupted", "distill", shards, teacher_model)
    assert distill_reference.same_training(config, overrides)
    run = RunDir.create(load_run_config(config, overrides))
    run.update_stage("distill", status="submitted", tasks=3, executor="local")
    from launcher.stages import resolve_distill
    from training.distill import prepare_student

    prepare_student(resolve_distill(load_run_config(config, overrides), run.layout))
    procs = run_trainer(run.path, 2, stage="distill")
    wait_for_step(run.path, "distill", 6)
    procs[0].send_signal(signal.SIGUSR2)
    assert [p.wait(timeout=120) for p in procs] == [REQUEUE_EXIT_CODE] * 2
    procs = run_trainer(run.path, 2, stage="distill")
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert losses(run.path, "distill") == distill_reference.losses
    assert bitwise_equal(distill_reference.weights, weights(run.path, "distill"))


@dataclass(frozen=True)
class _Cache:
    folder: Path  # the tests' folder: run configs, runs
    config: Path  # the distill run config
    tokens: Path  # the small token source the cache covers
    cache: Path  # the finished teacher-logits cache: read it, never write to it
    k: int


PLANNED = 4 * 2 * 2 * 2  # samples of the cached distillation: steps x ranks x micro-batch x accumulation


@pytest.fixture(scope="module")
def topk_cache(tmp_path_factory: pytest.TempPathFactory, corpora: dict[str, Path], tokenizer_dir: Path,
               teacher_model: Path) -> _Cache:
    """A teacher-logits cache with k = the whole vocabulary, made once by the stage (2 compute tasks, index)."""
    from sharding.corpus import read_corpus

    folder = tmp_path_factory.mktemp("topk")
    docs = list(read_corpus(corpora["wiki"]))[:20]
    (folder / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs))
    small = shard(folder / "s", [folder / "small.jsonl"], tokenizer_dir, "shard.seq_len=64",
                  "shard.val_fraction=0.3", "shard.clean.quality.min_words=5")
    vocab = json.loads((teacher_model / "config.json").read_text())["vocab_size"]
    config = train_config(folder / "kd", "distill", small, teacher_model)
    # Planned for the 4-step distillation below: 4 steps x (2 ranks x micro-batch 2 x accumulation 2) samples.
    assert main(["run", str(config), 'run.stages=["teacher_logits"]', f"teacher_logits.teacher={teacher_model}",
                 f"teacher_logits.source={small}", f"teacher_logits.k={vocab}", "teacher_logits.tasks=2",
                 f"teacher_logits.samples={PLANNED}"]) == 0
    return _Cache(folder, config, small, run_dir(folder / "kd", "distill") / "teacher_logits", vocab)


def test_cached_topk_with_the_whole_vocabulary_matches_the_live_teacher(topk_cache: _Cache, shards: Path,
                                                                        teacher_model: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import torch

    from sharding.shards import Manifest
    from training.data import DataError, OpenedSource
    from training.kd import kd_loss, kd_loss_topk
    from training.teacher_logits import TopkCache, planned_rows

    config, cache_dir, tmp_path = topk_cache.config, topk_cache.cache, topk_cache.folder
    tokens = OpenedSource(topk_cache.tokens)
    cache = TopkCache(cache_dir, tokens, teacher_model)
    # Only the rows the planned distillation reads are cached, each once: fewer than the source holds.
    assert cache.rows.tolist() == planned_rows(tokens, (PLANNED, 1234)).tolist()
    assert len(cache.rows) == PLANNED < tokens.rows  # within an epoch no row is drawn twice: 32 of 58 rows
    indices = topk_cache.cache / Manifest.load(topk_cache.cache).split_shards("topk_indices")[0].path
    assert pa.ipc.open_file(str(indices)).schema.field(0).type.value_type == pa.uint16()  # vocabulary <= 65,536
    lacking = int(np.setdiff1d(np.arange(tokens.rows), cache.rows)[0])
    with pytest.raises(DataError, match=rf"lacks token row {lacking} \(1 rows in all\) that this batch reads"):
        cache.batch([int(cache.rows[0]), lacking])
    rows = [int(r) for r in cache.rows[:4]]
    input_ids = torch.from_numpy(np.stack([tokens.get(r) for r in rows]).astype(np.int64))
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        teacher_logits = AutoModelForCausalLM.from_pretrained(teacher_model)(input_ids=input_ids).logits
    student_logits = torch.randn(teacher_logits.shape, generator=torch.Generator().manual_seed(0))
    values, indices = cache.batch(rows)
    args = {"alpha": 0.5, "temperature": 2.0, "divergence": "forward_kl"}
    live, _ = kd_loss(student_logits, teacher_logits, input_ids, **args)
    cached, _ = kd_loss_topk(student_logits, torch.from_numpy(values), torch.from_numpy(indices), input_ids, **args)
    assert float(cached) == pytest.approx(float(live), rel=1e-3)  # float16 cache: a few ulps per logit
    with pytest.raises(DataError, match="other token shards"):
        TopkCache(cache_dir, OpenedSource(shards), teacher_model)
    assert main(["run", str(config), 'run.stages=["distill"]', "run.name=cached", f"distill.topk_cache={cache_dir}",
                 f"distill.domain_val={shards}", "distill.steps=4", "distill.eval.every=4",
                 "distill.eval.batches=1", "distill.student_layer_choice=influence", "distill.student_bridge=true",
                 "distill.student_calibration_rows=6"]) == 0
    # One step more than the cache was planned for: what distill() checks before any engine starts (the 4-step
    # run below passes the same check), refused naming a missing row.
    with pytest.raises(DataError, match=rf"^teacher top-k cache {cache_dir} lacks token row \d+ \(\d+ rows in all\) "
                                        r"that distillation of 5 steps x 8 samples reads: it holds 32 rows, the first "
                                        r"32 samples of the stream with seed 1234; rerun teacher_logits"):
        cache.refuse_missing(planned_rows(tokens, (5 * 8, 1234)), "distillation of 5 steps x 8 samples")
    export = tmp_path / "kd" / "runs" / "cached" / "distill" / "export"
    provenance = json.loads((export / "provenance.json").read_text())
    assert provenance["topk_cache"] == str(cache_dir)
    # The student step measured block influence and bridged layers 1-2 into layer 0, on 6 rows of the source.
    student = json.loads((export.parent / "student-init" / "student.json").read_text())
    assert student["layer_choice"] == "influence" and student["kept_layers"] == [0, 3]
    assert student["bridge_rows"] == 6 and [b["replaces"] for b in student["bridges"]] == [[1, 2]]
    assert student["bridges"][0]["relative_error_after"] < student["bridges"][0]["relative_error_before"]


def test_a_cache_is_refused_once_the_teachers_weights_changed(topk_cache: _Cache, teacher_model: Path,
                                                             tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from training.data import DataError, OpenedSource
    from training.teacher_logits import TopkCache

    teacher = Path(shutil.copytree(teacher_model, tmp_path / "teacher"))
    TopkCache(topk_cache.cache, OpenedSource(topk_cache.tokens), teacher)  # the same weights elsewhere: accepted
    tensors = load_file(teacher / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 0.5  # the same config, one weight changed
    save_file(tensors, teacher / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DataError, match=rf"^teacher top-k cache {topk_cache.cache} was made with other weights than "
                                        rf"those of the teacher {teacher} now .*; rerun the teacher_logits stage$"):
        TopkCache(topk_cache.cache, OpenedSource(topk_cache.tokens), teacher)


def test_a_cache_made_with_other_document_masking_is_refused(topk_cache: _Cache, teacher_model: Path) -> None:
    from training.data import DataError, OpenedSource
    from training.teacher_logits import TopkCache

    TopkCache(topk_cache.cache, OpenedSource(topk_cache.tokens), teacher_model, document_mask=True)  # as made
    with pytest.raises(DataError, match=rf"^teacher top-k cache {topk_cache.cache} was made with document masking "
                                        r"and distill.model.document_mask is False: the teacher saw other attention"):
        TopkCache(topk_cache.cache, OpenedSource(topk_cache.tokens), teacher_model, document_mask=False)


def test_the_index_builds_the_manifest_from_what_the_writers_returned(topk_cache: _Cache, teacher_model: Path,
                                                                      tmp_path: Path) -> None:
    """compute() keeps what ShardWriter.close() returns as one record per output (which only close() can know
    whole); index() builds the manifest from the records, refuses a missing or wrong one, then removes them."""
    from common.publish import COMPLETE, publish_json
    from sharding.shards import MANIFEST, Manifest
    from training.config import TeacherLogitsConfig
    from training.teacher_logits import index

    assert sorted(p.name for p in topk_cache.cache.glob("*.json")) == [MANIFEST, "plan.json"]  # records removed
    made = Manifest.load(topk_cache.cache)
    out = Path(shutil.copytree(topk_cache.cache, tmp_path / "cache"))
    (out / COMPLETE).unlink()
    (out / MANIFEST).unlink()
    records = {info.path.removesuffix(".arrow") + ".json": asdict(info) for info in made.shards}
    for name, record in records.items():  # what the compute elements left before the index
        publish_json(out / name, record)
    cfg, first, plan = TeacherLogitsConfig(k=topk_cache.k, tasks=2), sorted(records)[0], (PLANNED, 1234)
    (out / first).unlink()
    with pytest.raises(RuntimeError, match=rf"^{first} is missing: the array element writing .* did not finish"):
        index(cfg, teacher_model, topk_cache.tokens, out, plan)
    publish_json(out / first, {**records[first], "bytes": records[first]["bytes"] + 1})
    with pytest.raises(RuntimeError, match=rf"^{first} does not describe .* on disk"):
        index(cfg, teacher_model, topk_cache.tokens, out, plan)
    publish_json(out / first, records[first])
    with pytest.raises(ValueError, match=r"was started for \{'samples': 32, 'seed': 1234\}, not every train row .*; "
                                         rf"delete {out} to make the cache for the new plan"):
        index(cfg, teacher_model, topk_cache.tokens, out)  # another plan: its records would never match
    assert index(cfg, teacher_model, topk_cache.tokens, out, plan) == {"shards": len(records) // 2}
    assert Manifest.load(out) == made and (out / COMPLETE).read_bytes() == (topk_cache.cache / COMPLETE).read_bytes()
    assert sorted(p.name for p in out.glob("*.json")) == [MANIFEST, "plan.json"]


def _fingerprint_on_two_ranks(rank: int, port: int, model: Path, empty: Path, answers: Path) -> None:
    import torch.distributed as dist

    from training import engine

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    try:
        if rank == 1:  # rank 0 reads the weights; the others only receive its answer
            engine.weights_fingerprint = lambda path: pytest.fail("rank 1 read the weights")
        fingerprint = engine.shared_weights_fingerprint(model)
        with pytest.raises(ValueError, match="has no weight files"):  # on every rank: none waits for good
            engine.shared_weights_fingerprint(empty)
        (answers / f"rank{rank}").write_text(fingerprint)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_the_teachers_weights_are_read_by_rank_0_alone(teacher_model: Path, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from training.engine import weights_fingerprint

    (tmp_path / "empty").mkdir()
    mp.spawn(_fingerprint_on_two_ranks, args=(free_port(), teacher_model, tmp_path / "empty", tmp_path), nprocs=2)
    assert {(tmp_path / f"rank{r}").read_text() for r in (0, 1)} == {weights_fingerprint(teacher_model)}


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_distillation_on_the_slurm_cluster(tmp_path: Path, shards: Path, teacher_model: Path) -> None:
    config = train_config(tmp_path, "distill", shards, teacher_model)
    assert main(["submit", str(config), "distill.resources.nodes=2", "distill.resources.tasks_per_node=1",
                 "distill.steps=6", "distill.resources.mem_gb=3"]) == 0
    run = RunDir(run_dir(tmp_path, "distill"))
    entry = wait_finished(run, "distill", timeout=600)
    assert entry["status"] == "completed", entry
    assert sorted(entry["tasks_done"]) == ["student/rank-0", "train/rank-0", "train/rank-1"]
    assert (run.path / "distill" / "export" / "COMPLETE").exists()
