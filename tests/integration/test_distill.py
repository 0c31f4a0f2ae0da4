"""The distill stage with real DeepSpeed engines in 2 processes: a 2-layer student from a 4-layer teacher."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from launcher.cli import main
from launcher.run_config import load_run_config
from launcher.rundir import RunDir
from training.stop import REQUEUE_EXIT_CODE

from .test_cpt import _run_trainer, wait_for_step

pytestmark = pytest.mark.slow


def distill_config(folder: Path, shards: Path, teacher: Path, *lines: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "distill.toml"
    path.write_text("\n".join([
        "[run]", f"root = {json.dumps(str(folder / 'runs'))}", 'name = "kd"', 'stages = ["distill"]',
        "[distill]", "steps = 12", f"teacher = {json.dumps(str(teacher))}", "student_layers = 2",
        f"domain_val = {json.dumps(str(shards))}", "temperature = 2.0", "alpha = 0.5", *lines,
        "[distill.model]", "dropout = 0.0",
        "[distill.data]", f"sources = {json.dumps([str(shards)])}",
        "[distill.optim]", "lr = 1e-3", "warmup_steps = 2",
        "[distill.engine]", "zero_stage = 3", "micro_batch = 2", "grad_accum = 2",
        "[distill.eval]", "every = 6", "batches = 2",
        "[distill.checkpoint]", "every_steps = 4",
        "[distill.resources]", "tasks_per_node = 2", "time_min = 20", ""]))
    return path


def records(run_dir: Path, kind: str) -> list[dict]:  # type: ignore[type-arg]
    lines = (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


@pytest.mark.parametrize("sharded_teacher", [False, True])
def test_zero3_distillation_of_a_student_from_teacher_layers(tmp_path: Path, shards: Path, teacher_model: Path,
                                                             sharded_teacher: bool) -> None:
    config = distill_config(tmp_path, shards, teacher_model)
    assert main(["run", str(config), f"distill.teacher_zero3={str(sharded_teacher).lower()}"]) == 0
    run_dir = tmp_path / "runs" / "kd"
    student = json.loads((run_dir / "distill" / "student-init" / "student.json").read_text())
    assert student["kept_layers"] == [0, 3] and student["params_student"] < student["params_teacher"]
    evals = records(run_dir, "eval")
    assert evals[0].get("base") and evals[-1]["domain_loss"] < evals[0]["domain_loss"]
    export = run_dir / "distill" / "export"
    provenance = json.loads((export / "provenance.json").read_text())
    assert provenance["objective"] == "distill" and provenance["teacher"] == str(teacher_model)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.num_hidden_layers == 2
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.generate(**tokenizer("The licensee", return_tensors="pt"), max_new_tokens=4,
                          do_sample=False).shape[1] > 2


def test_interrupted_distillation_resumes_bitwise(tmp_path: Path, shards: Path, teacher_model: Path) -> None:
    overrides = ["distill.steps=16", "distill.log_every=1", "distill.eval.every=8"]
    reference = distill_config(tmp_path / "reference", shards, teacher_model)
    assert main(["run", str(reference), *overrides]) == 0
    config = distill_config(tmp_path / "interrupted", shards, teacher_model)
    run = RunDir.create(load_run_config(config, overrides))
    run.update_stage("distill", status="submitted", tasks=3, executor="local")
    from training.distill import prepare_student

    prepare_student(load_run_config(config, overrides).distill, run.stage_dir("distill"))
    procs = _run_trainer(run.path, 2, 29631, stage="distill")
    wait_for_step(run.path / "distill" / "metrics.jsonl", 6)
    procs[0].send_signal(signal.SIGUSR2)
    assert [p.wait(timeout=120) for p in procs] == [REQUEUE_EXIT_CODE] * 2
    procs = _run_trainer(run.path, 2, 29632, stage="distill")
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ref_dir = tmp_path / "reference" / "runs" / "kd"
    assert {r["step"]: r["loss"] for r in records(run.path, "train")} == \
        {r["step"]: r["loss"] for r in records(ref_dir, "train")}
    a = load_file(str(ref_dir / "distill" / "export" / "model.safetensors"))
    b = load_file(str(run.path / "distill" / "export" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_cached_topk_with_the_whole_vocabulary_matches_the_live_teacher(
        tmp_path: Path, corpora: dict[str, Path], tokenizer_dir: Path, shards: Path, teacher_model: Path) -> None:
    import numpy as np
    import torch

    from sharding.corpus import read_corpus
    from training.data import DataError, OpenedSource
    from training.kd import kd_loss, kd_loss_topk
    from training.topk_cache import TopkCache

    from .conftest import shard_config

    records = list(read_corpus(corpora["wiki"]))[:20]
    (tmp_path / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "s").mkdir()
    assert main(["shard", str(shard_config(tmp_path / "s", [tmp_path / "small.jsonl"], tokenizer_dir)),
                 "shard.seq_len=64", "shard.val_fraction=0.3", "shard.clean.quality.min_words=5"]) == 0
    small = tmp_path / "s" / "runs" / "shard" / "shard"
    vocab = json.loads((teacher_model / "config.json").read_text())["vocab_size"]
    config = distill_config(tmp_path / "kd", small, teacher_model)
    assert main(["run", str(config), 'run.stages=["teacher_logits"]', f"teacher_logits.teacher={teacher_model}",
                 f"teacher_logits.source={small}", f"teacher_logits.k={vocab}", "teacher_logits.tasks=2"]) == 0
    cache_dir = tmp_path / "kd" / "runs" / "kd" / "teacher_logits"
    tokens = OpenedSource(small)
    cache = TopkCache(cache_dir, tokens, teacher_model)
    rows = list(range(min(4, tokens.rows)))
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
    export = tmp_path / "kd" / "runs" / "cached" / "distill" / "export"
    provenance = json.loads((export / "provenance.json").read_text())
    assert provenance["topk_cache"] == str(cache_dir)
    # The student step measured block influence and bridged layers 1-2 into layer 0, on 6 rows of the source.
    student = json.loads((export.parent / "student-init" / "student.json").read_text())
    assert student["layer_choice"] == "influence" and student["kept_layers"] == [0, 3]
    assert student["bridge_rows"] == 6 and [b["replaces"] for b in student["bridges"]] == [[1, 2]]
    assert student["bridges"][0]["relative_error_after"] < student["bridges"][0]["relative_error_before"]


@pytest.mark.slurm
@pytest.mark.usefixtures("slurm_cluster")
def test_distillation_on_the_slurm_cluster(tmp_path: Path, shards: Path, teacher_model: Path) -> None:
    from .helpers import wait_finished

    config = distill_config(tmp_path, shards, teacher_model)
    assert main(["submit", str(config), "distill.resources.nodes=2", "distill.resources.tasks_per_node=1",
                 "distill.steps=6", "distill.resources.mem_gb=3"]) == 0
    run = RunDir(tmp_path / "runs" / "kd")
    entry = wait_finished(run, "distill", timeout=600)
    assert entry["status"] == "completed", entry
    assert sorted(entry["tasks_done"]) == ["student/rank-0", "train/rank-0", "train/rank-1"]
    assert (run.path / "distill" / "export" / "COMPLETE").exists()
