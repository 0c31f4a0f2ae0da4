"""Stages by name, and the small callable submitit pickles to run one task of one stage step.

A stage is one or more steps run one after another (afterok on Slurm): the shard stage is a job
array that maps input files, then one reduce job. Every step is a pure function of (resolved
config, stage folder, task environment, array element).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import submitit

from launcher.config import config_hash
from launcher.run_config import RunConfig
from launcher.rundir import RunDir, now_iso
from sharding.stage import check_inputs, map_files, reduce_shards
from sharding.summary import summary_table
from slurm.probe import run_probe
from slurm.requeue import RequeueWitness
from slurm.resources import Resources
from slurm.taskenv import TaskEnv, task_env


def _no_array(cfg: RunConfig) -> int:
    return 0


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[RunConfig, Path, TaskEnv, int | None], Any]  # one task: (config, stage dir, env, element)
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


def _shard_map(cfg: RunConfig, out: Path, env: TaskEnv, element: int | None) -> Any:
    return map_files(cfg.shard, out, element or 0, cfg.shard.tasks)


def _shard_reduce(cfg: RunConfig, out: Path, env: TaskEnv, element: int | None) -> Any:
    return reduce_shards(cfg.shard, out, config_hash(cfg.shard.data_config()))


def _own_shards(sources: tuple[str, ...], out: Path) -> tuple[str, ...]:
    """No sources, or "" among them (e.g. ["", "general/shard"] for replay): this run's shard stage output."""
    return tuple(s or str(out.parent / "shard") for s in (sources or ("",)))


def _cpt_train(cfg: RunConfig, out: Path, env: TaskEnv, element: int | None) -> Any:
    from training.loop import CPT, train  # torch and deepspeed load only in the jobs that train

    train_cfg = replace(cfg.cpt, data=replace(cfg.cpt.data, sources=_own_shards(cfg.cpt.data.sources, out)))
    return train(train_cfg, out, env, CPT, config_hash(cfg.cpt))


def _cpt_preflight(cfg: RunConfig) -> None:
    if not (Path(cfg.cpt.model.path) / "config.json").is_file():
        raise ValueError(f"cpt.model.path '{cfg.cpt.model.path}' is not a local Hugging Face model folder")


def _distill_cfg(cfg: RunConfig, out: Path) -> Any:
    train_cfg = replace(cfg.distill, data=replace(cfg.distill.data, sources=_own_shards(cfg.distill.data.sources, out)))
    if not train_cfg.topk_cache and "teacher_logits" in cfg.run.stages:  # the pipeline's own cache
        train_cfg = replace(train_cfg, topk_cache=str(out.parent / "teacher_logits"))
    return train_cfg


def _topk_paths(cfg: RunConfig, out: Path) -> tuple[Path, Path]:
    teacher = Path(cfg.teacher_logits.teacher) if cfg.teacher_logits.teacher else out.parent / "cpt" / "export"
    source = Path(cfg.teacher_logits.source) if cfg.teacher_logits.source else out.parent / "shard"
    return teacher, source


def _topk_compute(cfg: RunConfig, out: Path, env: TaskEnv, element: int | None) -> Any:
    from training.topk_cache import compute

    return compute(cfg.teacher_logits, *_topk_paths(cfg, out), out, element or 0)


def _topk_index(cfg: RunConfig, out: Path, env: TaskEnv, element: int | None) -> Any:
    from training.topk_cache import index

    return index(cfg.teacher_logits, *_topk_paths(cfg, out), out)


def _distill_student(cfg: RunConfig, out: Path, env: TaskEnv, element: int | None) -> Any:
    from training.distill import prepare_student

    return prepare_student(_distill_cfg(cfg, out), out)


def _distill_train(cfg: RunConfig, out: Path, env: TaskEnv, element: int | None) -> Any:
    from training.distill import distil

    return distil(_distill_cfg(cfg, out), out, env, config_hash(cfg.distill))


def _distill_preflight(cfg: RunConfig) -> None:
    if not cfg.distill.student_layers and not (Path(cfg.distill.model.path) / "config.json").is_file():
        raise ValueError("set distill.student_layers (a student from the teacher's layers) or distill.model.path")
    if cfg.distill.teacher and not (Path(cfg.distill.teacher) / "config.json").is_file():
        raise ValueError(f"distill.teacher '{cfg.distill.teacher}' is not a local Hugging Face model folder")
    uses_cache = bool(cfg.distill.topk_cache) or "teacher_logits" in cfg.run.stages
    if uses_cache and cfg.distill.divergence == "reverse_kl" and cfg.distill.topk_student_norm == "vocab":
        raise ValueError("distill.divergence = 'reverse_kl' against cached top-k logits needs "
                         "distill.topk_student_norm = 'topk' (over the whole vocabulary it is infinite)")


def _report(cfg: RunConfig, out: Path, env: TaskEnv, element: int | None) -> Any:
    from training.report_stage import run_report

    r = cfg.report
    domain = r.domain_val or cfg.cpt.domain_val or str(out.parent / "shard")
    return run_report(r, out, r.base or cfg.cpt.model.path, domain, r.general_val or cfg.cpt.general_val)


def _stages() -> MappingProxyType[str, Stage]:
    probe = Step("probe", lambda cfg, out, env, element: run_probe(cfg.probe, out, env, element),
                 lambda cfg: cfg.probe.array_size)
    shard = Stage("shard", (Step("map", _shard_map, lambda cfg: cfg.shard.tasks),
                            Step("reduce", _shard_reduce, single_task=True)),
                  preflight=lambda cfg: check_inputs(cfg.shard), summary=summary_table)
    cpt = Stage("cpt", (Step("train", _cpt_train),), preflight=_cpt_preflight)
    topk = Stage("teacher_logits", (Step("compute", _topk_compute, lambda cfg: cfg.teacher_logits.tasks),
                                    Step("index", _topk_index, single_task=True)))
    distill = Stage("distill", (Step("student", _distill_student, single_task=True), Step("train", _distill_train)),
                    preflight=_distill_preflight)
    report = Stage("report", (Step("report", _report, single_task=True),))
    return MappingProxyType({"probe": Stage("probe", (probe,)), "shard": shard, "cpt": cpt,
                              "teacher_logits": topk, "distill": distill, "report": report})


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
        out = run.stage_dir(self.stage)
        out.mkdir(parents=True, exist_ok=True)
        (step,) = [s for s in STAGES[self.stage].steps if s.name == self.step]
        if env.is_main or self.element is not None:
            run.update_stage(self.stage, status="running", attempt=env.restart_count + 1, last_started_at=now_iso())
        witness = RequeueWitness().install()
        try:
            result = step.run(cfg, out, env, self.element)
        except Exception as e:
            witness.wait_if_requeued(env.rank, e)  # an error that only echoes rank 0's requeue is not a failure
            witness.uninstall()
            run.update_stage(self.stage, status="failed", error=f"{tag}: {type(e).__name__}: {e}",
                             finished_at=now_iso())
            raise
        witness.ignore_from_now()  # finished: a stop signal now must neither requeue this task nor kill it
        run.update_stage(self.stage, task_done=tag)
        return result
