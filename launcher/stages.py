"""Stages by name, and the small callable submitit pickles to run one task of one stage step.

A stage is one or more steps run one after another (afterok on Slurm): the shard stage is a job
array that maps input files, then one reduce job. Every step is a pure function of (resolved
config, run layout, task environment, array element); the step resolves the paths its stage reads and
writes from the layout and hands them to the stage's code, which never computes another stage's folder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import submitit

from launcher.config import config_hash
from launcher.layout import RunLayout
from launcher.run_config import RunConfig
from launcher.rundir import RunDir, now_iso
from slurm.requeue import RequeueWitness
from slurm.resources import Resources
from slurm.taskenv import TaskEnv, task_env


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


@dataclass(frozen=True)
class Stage:
    name: str
    steps: tuple[Step, ...]
    preflight: Callable[[RunConfig], None] = _no_preflight  # raises ValueError before any job is submitted
    summary: Callable[[Path], Any] | None = None  # a rich renderable of the finished stage's folder


def _probe(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from slurm.probe import run_probe

    return run_probe(cfg.probe, layout.stage("probe"), env, element)


def _shard_map(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from sharding.stage import map_files

    return map_files(cfg.shard, layout.stage("shard"), element or 0, cfg.shard.tasks)


def _shard_reduce(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from sharding.stage import reduce_shards

    return reduce_shards(cfg.shard, layout.stage("shard"), config_hash(cfg.shard.data_config()))


def _shard_preflight(cfg: RunConfig) -> None:
    from sharding.stage import check_inputs

    check_inputs(cfg.shard)


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
    if not (Path(cfg.cpt.model.path) / "config.json").is_file():
        raise ValueError(f"cpt.model.path '{cfg.cpt.model.path}' is not a local Hugging Face model folder")


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


def _teacher_logits_compute(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from training.teacher_logits import compute

    teacher, tokens = _teacher_logits_inputs(cfg, layout)
    return compute(cfg.teacher_logits, teacher, tokens, layout.stage("teacher_logits"), element or 0)


def _teacher_logits_index(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from training.teacher_logits import index

    teacher, tokens = _teacher_logits_inputs(cfg, layout)
    return index(cfg.teacher_logits, teacher, tokens, layout.stage("teacher_logits"))


def _distill_student(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from training.distill import prepare_student

    return prepare_student(resolve_distill(cfg, layout))


def _distill_train(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from training.distill import distill

    return distill(resolve_distill(cfg, layout), _train_paths(layout, "distill"), env, config_hash(cfg.distill))


def _distill_preflight(cfg: RunConfig) -> None:
    if not cfg.distill.student_layers and not (Path(cfg.distill.model.path) / "config.json").is_file():
        raise ValueError("set distill.student_layers (a student from the teacher's layers) or distill.model.path")
    if cfg.distill.teacher and not (Path(cfg.distill.teacher) / "config.json").is_file():
        raise ValueError(f"distill.teacher '{cfg.distill.teacher}' is not a local Hugging Face model folder")
    uses_cache = bool(cfg.distill.topk_cache) or "teacher_logits" in cfg.run.stages
    if uses_cache and cfg.distill.divergence == "reverse_kl" and cfg.distill.topk_student_norm == "vocab":
        raise ValueError("distill.divergence = 'reverse_kl' against cached top-k logits needs "
                         "distill.topk_student_norm = 'topk' (over the whole vocabulary it is infinite)")


def _report(cfg: RunConfig, layout: RunLayout, env: TaskEnv, element: int | None) -> Any:
    from training.report_stage import run_report

    r = cfg.report
    base = r.base or cfg.cpt.model.path
    models = {**({"base": Path(base)} if base else {}), "teacher": layout.export("cpt"),
              "student": layout.export("distill")}
    val_sets = {"domain": Path(r.domain_val or cfg.cpt.domain_val or layout.stage("shard"))}
    if general := r.general_val or cfg.cpt.general_val:
        val_sets["general"] = Path(general)
    metrics = {stage: layout.metrics(stage) for stage in ("cpt", "distill")}
    return run_report(r, layout.stage("report"), models, val_sets, metrics)


def _stages() -> MappingProxyType[str, Stage]:
    probe = Step("probe", _probe, lambda cfg: cfg.probe.array_size)
    shard = Stage("shard", (Step("map", _shard_map, lambda cfg: cfg.shard.tasks),
                            Step("reduce", _shard_reduce, single_task=True)),
                  preflight=_shard_preflight, summary=_shard_summary)
    cpt = Stage("cpt", (Step("train", _cpt_train),), preflight=_cpt_preflight)
    teacher_logits = Stage("teacher_logits", (
        Step("compute", _teacher_logits_compute, lambda cfg: cfg.teacher_logits.tasks),
        Step("index", _teacher_logits_index, single_task=True)))
    distill = Stage("distill", (Step("student", _distill_student, single_task=True), Step("train", _distill_train)),
                    preflight=_distill_preflight)
    report = Stage("report", (Step("report", _report, single_task=True),))
    return MappingProxyType({"probe": Stage("probe", (probe,)), "shard": shard, "cpt": cpt,
                              "teacher_logits": teacher_logits, "distill": distill, "report": report})


STAGES = _stages()


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
        run.stage_dir(self.stage).mkdir(parents=True, exist_ok=True)
        (step,) = [s for s in STAGES[self.stage].steps if s.name == self.step]
        if env.is_main or self.element is not None:
            run.update_stage(self.stage, status="running", attempt=env.restart_count + 1, last_started_at=now_iso())
        witness = RequeueWitness().install()
        try:
            result = step.run(cfg, run.layout, env, self.element)
        except Exception as e:
            witness.wait_if_requeued(env.rank, e)  # an error that only echoes rank 0's requeue is not a failure
            witness.uninstall()
            run.update_stage(self.stage, status="failed", error=f"{tag}: {type(e).__name__}: {e}",
                             finished_at=now_iso())
            raise
        witness.ignore_from_now()  # finished: a stop signal now must neither requeue this task nor kill it
        run.update_stage(self.stage, task_done=tag)
        return result
