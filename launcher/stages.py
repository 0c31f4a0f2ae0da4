"""Stages by name, and the small callable submitit pickles to run one task of one stage step.

A stage is one or more steps run one after another (afterok on Slurm): the shard stage is a job array that
maps input files, an array over dedup buckets, one cluster job, an array that packs, and one finish job.
Every step is a pure function of (resolved config, run layout, task environment, array element); the step
resolves the paths its stage reads and writes from the layout and hands them to the stage's code, which
never computes another stage's folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import submitit

from launcher.checks import (
    check_model,
    check_shards,
    check_training_inputs,
    has_tokenizer,
    made_earlier,
    not_made,
    preflight_layout,
    tokenizer_of,
    tokenizer_sha256,
)
from launcher.config import config_hash
from launcher.layout import RunLayout
from launcher.run_config import RunConfig
from launcher.rundir import RunDir, now_iso
from slurm.executor import NEVER_SATISFIED, TERMINAL_STATES, SubmissionError, make_executor
from slurm.requeue import RequeueWitness
from slurm.resources import Resources
from slurm.taskenv import TaskEnv, scheduler_job_id, task_env
from training.stop import REQUEUE_EXIT_CODE


def _no_array(cfg: RunConfig) -> int:
    return 0


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[RunConfig, RunLayout, TaskEnv, int | None], Any]  # one task: (config, run layout, env, element)
    array_size: Callable[[RunConfig], int] = _no_array  # >0: a job array of that many elements
    single_task: bool = False  # one process whatever the stage's nodes and tasks (e.g. a reduce)

    def resources(self, stage_resources: Resources) -> Resources:
        return replace(stage_resources, nodes=1, tasks_per_node=1) if self.single_task else stage_resources

    def task_count(self, cfg: RunConfig, stage_resources: Resources) -> int:
        return self.array_size(cfg) or self.resources(stage_resources).tasks


def _no_preflight(cfg: RunConfig) -> None:
    return None


# Preflight: every folder a stage reads is made by a stage listed before it in this run, or exists and is whole.
# Paths come from the same resolvers the steps use (_own_shards, resolve_distill, _teacher_logits_inputs,
# _report_inputs), on the layout the jobs will see.

@dataclass(frozen=True)
class Stage:
    name: str
    steps: tuple[Step, ...]
    preflight: Callable[[RunConfig], None] = _no_preflight  # raises ValueError before any job is submitted
    summary: Callable[[Path], Any] | None = None  # a rich renderable of the finished stage's folder


def _probe(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from slurm.probe import run_probe

    return run_probe(cfg.probe, layout.stage("probe"), env, element)


def _shard_elements(cfg: RunConfig) -> int:
    """Map and pack array elements: shard.tasks, but no more than there are map units (input files, large ones
    counted by their pieces: `sharding.units`, from one stat per file). The units are shared by size, each element
    getting one before any gets two, and packing groups (never more than units) g go to element g % shard.tasks,
    so an element past the last unit would only start, find nothing and leave; the count stays shard.tasks when
    the inputs expand to nothing or not at all (the preflight says why)."""
    from sharding.readers import InputError, expand_inputs
    from sharding.stage import stat_inputs
    from sharding.units import plan_units

    try:
        units = len(plan_units(stat_inputs(expand_inputs(cfg.shard.inputs)), cfg.shard.split_mb))
    except (InputError, ValueError):
        return cfg.shard.tasks
    return min(cfg.shard.tasks, units) if units else cfg.shard.tasks


def _shard_map(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from sharding.stage import map_files

    return map_files(cfg.shard, layout.stage("shard"), element or 0, cfg.shard.tasks)


def _shard_dedup(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from sharding.reduce import dedup_bucket

    return dedup_bucket(cfg.shard, layout.stage("shard"), element or 0)


def _shard_cluster(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from sharding.reduce import cluster_pairs

    return cluster_pairs(cfg.shard, layout.stage("shard"))


def _shard_pack(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from sharding.reduce import pack_step

    return pack_step(cfg.shard, layout.stage("shard"), element or 0, cfg.shard.tasks)


def _shard_finish(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from sharding.reduce import finish

    return finish(cfg.shard, layout.stage("shard"), config_hash(cfg.shard.data_config()))


def _shard_preflight(cfg: RunConfig) -> None:
    from sharding.dedup_index import INDEX_FILE, Previous
    from sharding.stage import check_inputs

    # With the run's shard folder: a rerun whose inputs changed since the stage started (or completed) is refused.
    check_inputs(cfg.shard, preflight_layout(cfg).stage("shard"))
    for i, folder in enumerate(cfg.shard.dedup.previous):
        if not (Path(folder) / INDEX_FILE).is_file():
            raise ValueError(f"shard.dedup.previous[{i}] '{folder}' is not a finished shard folder "
                             f"(no {INDEX_FILE})")
    # index.json by sha256 and every part by size here; the dedup tasks check the parts' XXH3 before use.
    Previous.load([Path(p) for p in cfg.shard.dedup.previous], cfg.shard.dedup.minhash, sizes=True)


def _shard_summary(folder: Path) -> Any:
    from sharding.summary import summary_table

    return summary_table(folder)


def _own_shards(sources: tuple[str, ...], layout: RunLayout) -> tuple[str, ...]:
    """No sources, or "" among them (e.g. ["", "general/shard"] for replay): this run's shard stage output."""
    return tuple(s or str(layout.stage("shard")) for s in (sources or ("",)))


def _train_paths(layout: RunLayout, stage: str) -> Any:
    from training.loop import TrainPaths

    return TrainPaths(folder=layout.stage(stage), checkpoints=layout.checkpoints(stage), export=layout.export(stage),
                      metrics=layout.metrics(stage), progress=layout.progress(stage))


def _cpt_train(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from training.loop import CPT, train  # torch and deepspeed load only in the jobs that train

    train_cfg = replace(cfg.cpt, data=replace(cfg.cpt.data, sources=_own_shards(cfg.cpt.data.sources, layout)))
    return train(train_cfg, _train_paths(layout, "cpt"), env, CPT, config_hash(cfg.cpt))


def _cpt_preflight(cfg: RunConfig) -> None:
    check_model(cfg, "cpt", "cpt.model.path", cfg.cpt.model.path)
    layout = preflight_layout(cfg)
    train = replace(cfg.cpt, data=replace(cfg.cpt.data, sources=_own_shards(cfg.cpt.data.sources, layout)))
    check_training_inputs(cfg, "cpt", train, cfg.cpt.model.path)


def resolve_distill(cfg: RunConfig, layout: RunLayout) -> Any:
    """The distill section with every path resolved: data, teacher, student and the teacher-logits cache."""
    d = cfg.distill
    return replace(d, data=replace(d.data, sources=_own_shards(d.data.sources, layout)),
                   teacher=d.teacher or str(layout.export("cpt")),
                   model=replace(d.model, path=str(layout.student_init)) if d.student_layers else d.model,
                   topk_cache=d.topk_cache or (str(layout.stage("teacher_logits"))
                                               if "teacher_logits" in cfg.run.stages else ""))


def _teacher_logits_inputs(cfg: RunConfig, layout: RunLayout) -> tuple[Path, Path]:
    """The teacher-logits stage's teacher and token shards ("": this run's cpt export and shards)."""
    teacher = Path(cfg.teacher_logits.teacher or layout.export("cpt"))
    source = Path(cfg.teacher_logits.source or layout.stage("shard"))
    return teacher, source


def _teacher_logits_plan(cfg: RunConfig) -> tuple[int, int] | None:
    """(samples, seed) of the stream rows to cache: what this run's distillation reads (steps x global batch),
    or teacher_logits.samples when set; None (every train row) for a cache made without a distillation to plan
    for."""
    d = cfg.distill
    if cfg.teacher_logits.samples:
        return cfg.teacher_logits.samples, d.data.seed
    if "distill" not in cfg.run.stages:
        return None
    return d.steps * d.engine.micro_batch * d.engine.grad_accum * d.resources.tasks, d.data.seed


def _teacher_logits_preflight(cfg: RunConfig) -> None:
    teacher, source = _teacher_logits_inputs(cfg, preflight_layout(cfg))
    key = "teacher_logits.teacher" + ("" if cfg.teacher_logits.teacher else ' ("": this run\'s cpt export)')
    config = check_model(cfg, "teacher_logits", key, teacher)
    if config and cfg.teacher_logits.k > int(config.get("vocab_size", cfg.teacher_logits.k)):
        raise ValueError(f"teacher_logits.k = {cfg.teacher_logits.k} exceeds the teacher's vocabulary of "
                         f"{config['vocab_size']}")
    key = "teacher_logits.source" + ("" if cfg.teacher_logits.source else ' ("": this run\'s shards)')
    check_shards(cfg, "teacher_logits", key, source, "train")


def _teacher_logits_compute(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from training.teacher_logits import compute

    teacher, tokens = _teacher_logits_inputs(cfg, layout)
    return compute(cfg.teacher_logits, teacher, tokens, layout.stage("teacher_logits"), element or 0,
                   _teacher_logits_plan(cfg), cfg.distill.model.document_mask)


def _teacher_logits_index(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from training.teacher_logits import index

    teacher, tokens = _teacher_logits_inputs(cfg, layout)
    return index(cfg.teacher_logits, teacher, tokens, layout.stage("teacher_logits"), _teacher_logits_plan(cfg),
                 cfg.distill.model.document_mask)


def _distill_student(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from training.distill import prepare_student

    return prepare_student(resolve_distill(cfg, layout))


def _distill_train(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from training.distill import distill

    return distill(resolve_distill(cfg, layout), _train_paths(layout, "distill"), env, config_hash(cfg.distill))


def _distill_preflight(cfg: RunConfig) -> None:
    from common.publish import COMPLETE

    d, layout = cfg.distill, preflight_layout(cfg)
    uses_cache = bool(d.topk_cache) or "teacher_logits" in cfg.run.stages
    if uses_cache and d.divergence == "reverse_kl" and d.topk_student_norm == "vocab":
        raise ValueError("distill.divergence = 'reverse_kl' against cached top-k logits needs "
                         "distill.topk_student_norm = 'topk' (over the whole vocabulary it is infinite)")
    resolved = resolve_distill(cfg, layout)
    key = "distill.teacher" + ("" if d.teacher else ' ("": this run\'s cpt export)')
    teacher = check_model(cfg, "distill", key, resolved.teacher)
    student = resolved.teacher  # a student made of the teacher's layers has the teacher's tokenizer
    if not d.student_layers:
        if not d.model.path:
            raise ValueError("set distill.student_layers (a student from the teacher's layers) or distill.model.path")
        check_model(cfg, "distill", "distill.model.path", d.model.path)
        student = d.model.path
        teacher_tokenizer = tokenizer_of(cfg, "distill", resolved.teacher)
        if has_tokenizer(teacher_tokenizer) and tokenizer_sha256(student) != tokenizer_sha256(teacher_tokenizer):
            raise ValueError(f"distill.model.path '{student}' has another tokenizer than the teacher "
                             f"'{resolved.teacher}': a student must share its teacher's vocabulary")
    elif d.student_layers < 2:
        raise ValueError(f"distill.student_layers = {d.student_layers}: a student keeps at least the first and "
                         "the last layer (2)")
    elif teacher and d.student_layers > int(teacher.get("num_hidden_layers", d.student_layers)):
        raise ValueError(f"distill.student_layers = {d.student_layers} exceeds the teacher's "
                         f"{teacher['num_hidden_layers']} layers")
    check_training_inputs(cfg, "distill", resolved, student)
    if not resolved.topk_cache:
        return
    if len(resolved.data.sources) != 1:
        raise ValueError(f"distill reads a teacher top-k cache, which is aligned with one token source; "
                         f"distill.data.sources gives {len(resolved.data.sources)}")
    if made_earlier(cfg, "distill", resolved.topk_cache) == "teacher_logits":
        teacher_dir, source = _teacher_logits_inputs(cfg, layout)
        if source.resolve() != Path(resolved.data.sources[0]).resolve():
            raise ValueError(f"distill.data.sources[0] '{resolved.data.sources[0]}' is not the token source this "
                             f"run's teacher_logits caches ('{source}'): set teacher_logits.source to it")
        if teacher_dir.resolve() != Path(resolved.teacher).resolve():
            raise ValueError(f"distill.teacher '{resolved.teacher}' is not the teacher this run's teacher_logits "
                             f"runs ('{teacher_dir}'): set teacher_logits.teacher to it")
    elif not (Path(resolved.topk_cache) / COMPLETE).is_file():
        raise not_made(cfg, "distill", "distill.topk_cache", resolved.topk_cache,
                        "is not a finished teacher-logits cache (no COMPLETE)")


def _report_inputs(cfg: RunConfig, layout: RunLayout) -> tuple[dict[str, Path], dict[str, Path], dict[str, Path]]:
    """The report's models, validation sets and training curves ("" defaults: cpt's, then this run's)."""
    r = cfg.report
    base = r.base or cfg.cpt.model.path
    models = {**({"base": Path(base)} if base else {}), "teacher": layout.export("cpt"),
              "student": layout.export("distill")}
    val_sets = {"domain": Path(r.domain_val or cfg.cpt.domain_val or layout.stage("shard"))}
    if general := r.general_val or cfg.cpt.general_val:
        val_sets["general"] = Path(general)
    metrics = {stage: layout.metrics(stage) for stage in ("cpt", "distill")}
    return models, val_sets, metrics


def _report(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from training.report_stage import run_report

    models, val_sets, metrics = _report_inputs(cfg, layout)
    return run_report(cfg.report, layout.stage("report"), models, val_sets, metrics)


def _report_preflight(cfg: RunConfig) -> None:
    models, val_sets, _ = _report_inputs(cfg, preflight_layout(cfg))
    if "base" not in models:
        raise ValueError("report needs a base model: set report.base (or cpt.model.path)")
    check_model(cfg, "report", "report.base" + ("" if cfg.report.base else ' ("": cpt.model.path)'),
                 models["base"])
    keys = {"domain": "report.domain_val" if cfg.report.domain_val else (
                'report.domain_val ("": cpt.domain_val)' if cfg.cpt.domain_val
                else 'report.domain_val ("": this run\'s shards)'),
            "general": "report.general_val" if cfg.report.general_val else 'report.general_val ("": cpt.general_val)'}
    for name, path in val_sets.items():
        check_shards(cfg, "report", keys[name], path, "val")


def _stages() -> MappingProxyType[str, Stage]:
    probe = Step("probe", _probe, lambda cfg: cfg.probe.array_size)
    shard = Stage("shard", (Step("map", _shard_map, _shard_elements),
                            Step("dedup", _shard_dedup, lambda cfg: cfg.shard.dedup.buckets),
                            Step("cluster", _shard_cluster, single_task=True),
                            Step("pack", _shard_pack, _shard_elements),
                            Step("finish", _shard_finish, single_task=True)),
                  preflight=_shard_preflight, summary=_shard_summary)
    cpt = Stage("cpt", (Step("train", _cpt_train),), preflight=_cpt_preflight)
    teacher_logits = Stage("teacher_logits", (
        Step("compute", _teacher_logits_compute, lambda cfg: cfg.teacher_logits.tasks),
        Step("index", _teacher_logits_index, single_task=True)), preflight=_teacher_logits_preflight)
    distill = Stage("distill", (Step("student", _distill_student, single_task=True), Step("train", _distill_train)),
                    preflight=_distill_preflight)
    report = Stage("report", (Step("report", _report, single_task=True),), preflight=_report_preflight)
    return MappingProxyType({"probe": Stage("probe", (probe,)), "shard": shard, "cpt": cpt,
                              "teacher_logits": teacher_logits, "distill": distill, "report": report})


STAGES = _stages()


def _other_live_owners(run: RunDir, stage: str) -> list[str] | None:
    """The live jobs that own `stage` when this task's job is not among them, else None.

    The stage's owner is the submission state.json records (the launcher records it under the run lock). A
    job of an older submission that still starts (the launcher lost track of it, or someone ran sbatch by
    hand) must not write next to the owner. An id not yet recorded (a job that starts in the moment between
    sbatch and the launcher writing its id) is given the benefit of the doubt: nothing recorded runs.
    """
    mine, entry = scheduler_job_id(), run.read_state()["stages"].get(stage, {})
    if mine is None or not entry.get("job_ids") or mine in entry["job_ids"]:
        return None
    try:
        states = make_executor(entry["executor"]).states(entry["job_ids"])
    except SubmissionError:
        return None  # the scheduler cannot be asked from here: do not block the work on it
    alive = [j for j in entry["job_ids"] if j in states and states[j] not in TERMINAL_STATES | {NEVER_SATISFIED}]
    return alive or None


class StageTask(submitit.helpers.Checkpointable):
    """One task of one step of one stage: names and a path, nothing else.

    Everything else (config, data, models) is read inside the job, so the pickle stays tiny and a
    requeued job picks up the run directory as it is then. As a Checkpointable it is resubmitted
    as it is on the preemption signal; steps resume from their own saved state.
    """

    def __init__(self, stage: str, step: str, run_dir: str, element: int | None = None) -> None:
        self.stage, self.step, self.run_dir, self.element = stage, step, run_dir, element

    def __repr__(self) -> str:
        return f"StageTask({self.stage!r}, {self.step!r}, {self.run_dir!r}, element={self.element})"

    def __call__(self) -> Any:
        run = RunDir(Path(self.run_dir))
        cfg = run.load_config()
        env = task_env()
        who = f"element-{self.element}" if self.element is not None else f"rank-{env.rank}"
        tag = f"{self.step}/{who}"
        if (owners := _other_live_owners(run, self.stage)) is not None:
            print(f"[stillroom] {self.stage}: this job ({scheduler_job_id()}) is not the stage's current submission; "
                  f"jobs {', '.join(owners)} are, and still run: leaving without touching the stage", flush=True)
            return None
        run.stage_dir(self.stage).mkdir(parents=True, exist_ok=True)
        (step,) = [s for s in STAGES[self.stage].steps if s.name == self.step]
        if env.is_main or self.element is not None:
            run.update_stage(self.stage, status="running", attempt=env.restart_count + 1, last_started_at=now_iso())
        witness = RequeueWitness().install()
        try:
            result = step.run(cfg, run.layout, env, self.element)
        except SystemExit as e:
            if e.code == REQUEUE_EXIT_CODE and (env.is_main or self.element is not None):
                run.update_stage(self.stage, status="stopped", stopped_at=now_iso())  # saved; resumes when rerun
            raise
        except Exception as e:
            witness.wait_if_requeued(env.rank, e)  # an error that only echoes rank 0's requeue is not a failure
            witness.uninstall()
            run.update_stage(self.stage, status="failed", error=f"{tag}: {type(e).__name__}: {e}",
                             finished_at=now_iso())
            raise
        witness.ignore_from_now()  # finished: a stop signal now must neither requeue this task nor kill it
        run.update_stage(self.stage, task_done=tag)
        return result
