"""What `launch` decides, against a fake scheduler: the real config, run directory and state.json.

Which stages are submitted, skipped or left alone, and which job each one waits on (afterok), are
otherwise only seen on the real cluster (tests/integration). Here no job runs: `FakeExecutor` records
each JobSpec and reports the scheduler states a test sets. No stage needs a model or data on disk:
`launch` runs no preflight, and `job_spec`/`task_count` read only the config.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from submitit.core.utils import FailedJobError

from launcher.pipeline import StageFailed, StageStopped, launch
from launcher.run_config import RunConfig, load_run_config
from launcher.rundir import RunDir
from launcher.stages import STAGES, Stage, StageTask, Step
from slurm.executor import NEVER_SATISFIED, SubmissionError
from tests.fakes import FakeExecutor, FakeJob
from training.stop import REQUEUE_EXIT_CODE

PIPELINE = ["shard", "cpt", "teacher_logits", "distill", "report"]

# Every step of the full pipeline, in the order `launch` must submit them (run name "pipe").
SHARD_JOBS = ["pipe.shard.map", "pipe.shard.dedup", "pipe.shard.cluster", "pipe.shard.pack", "pipe.shard.finish"]
PIPELINE_JOBS = [*SHARD_JOBS, "pipe.cpt.train", "pipe.teacher_logits.compute", "pipe.teacher_logits.index",
                 "pipe.distill.student", "pipe.distill.train", "pipe.report"]

# A shard stage of shard.tasks=2 and shard.dedup.buckets=2 submitted earlier, by step: arrays map, dedup and
# pack, single cluster and finish, each job waiting on the one before.
OLD_SHARD = {"map": ["500_0", "500_1"], "dedup": ["501_0", "501_1"], "cluster": ["502"], "pack": ["503_0", "503_1"],
             "finish": ["504"]}
OLD_SHARD_IDS = [j for ids in OLD_SHARD.values() for j in ids]
SHARD_TASKS = 2 + 2 + 1 + 2 + 1  # every element of the three arrays, one each for cluster and finish
# The same shard stage, submitted afresh by a FakeExecutor whose ids start at 1000.
NEW_SHARD = [["1000_0", "1000_1"], ["1001_0", "1001_1"], ["1002"], ["1003_0", "1003_1"], ["1004"]]
NEW_SHARD_IDS = [j for ids in NEW_SHARD for j in ids]


def make_run(tmp_path: Path, stages: list[str], *overrides: str) -> tuple[RunConfig, RunDir]:
    """A real run directory for a config that needs nothing on disk (launch does no preflight)."""
    cfg = load_run_config(None, [
        f"run.root={tmp_path / 'runs'}", "run.name=pipe", f"run.stages={json.dumps(stages)}",
        "shard.tasks=3", "shard.dedup.buckets=2", "teacher_logits.tasks=2",
        "cpt.resources.tasks_per_node=2",  # one job of 2 processes: 2 tasks report done
        "distill.resources.nodes=2", "distill.resources.tasks_per_node=2",  # student: 1 task, train: 4
        *overrides])
    return cfg, RunDir.create(cfg)


def run_launch(cfg: RunConfig, run: RunDir, fake: FakeExecutor, *, wait: bool = False) -> str:
    out = io.StringIO()
    launch(cfg, run, fake, wait=wait, console=Console(file=out, width=250))
    return out.getvalue()


def stages_of(run: RunDir) -> dict[str, Any]:
    return json.loads(run.state_path.read_text())["stages"]  # type: ignore[no-any-return]


def test_fresh_pipeline_submits_every_step_once_each_after_the_step_before(tmp_path: Path) -> None:
    cfg, run = make_run(tmp_path, PIPELINE)
    fake = FakeExecutor()
    out = run_launch(cfg, run, fake)

    assert fake.names == PIPELINE_JOBS
    # afterok chain: the first job waits on nothing, every later one on the job (array) just before it.
    subs = fake.submissions
    assert subs[0].after == ()
    for before, sub in zip(subs, subs[1:], strict=False):
        assert sub.after == (before.base_id,), f"{sub.name} should wait on {before.name}"
    assert [s.is_array for s in subs] == [True, True, False, True, False, False, True, False, False, False, False]
    assert [s.tasks for s in subs] == [3, 2, 1, 3, 1, 1, 2, 1, 1, 1, 1]
    assert [s.resources.tasks for s in subs] == [1, 1, 1, 1, 1, 2, 1, 1, 1, 4, 1]  # single_task steps ask for one
    assert [(s.stage, s.step) for s in subs] == [
        ("shard", "map"), ("shard", "dedup"), ("shard", "cluster"), ("shard", "pack"), ("shard", "finish"),
        ("cpt", "train"), ("teacher_logits", "compute"), ("teacher_logits", "index"), ("distill", "student"),
        ("distill", "train"), ("report", "report")]
    assert all(s.folder == run.log_dir(s.stage or "") for s in subs)
    assert all(Path(t.run_dir) == run.path for s in subs for t in s.spec.tasks)  # type: ignore[attr-defined]
    assert [t.element for t in fake.by_name("pipe.shard.map").spec.tasks] == [0, 1, 2]  # type: ignore[attr-defined]
    assert [t.element for t in fake.by_name("pipe.shard.dedup").spec.tasks] == [0, 1]  # type: ignore[attr-defined]
    assert [t.element for t in fake.by_name("pipe.shard.pack").spec.tasks] == [0, 1, 2]  # type: ignore[attr-defined]

    stages = stages_of(run)
    assert sorted(stages) == sorted(PIPELINE)
    for stage, entry in stages.items():
        ids = [j for s in subs if s.stage == stage for j in s.job_ids]
        assert entry["status"] == "submitted" and entry["executor"] == "slurm", stage
        assert entry["job_ids"] == ids and entry["tasks_done"] == [] and entry["error"] is None, stage
    assert stages["shard"]["job_ids"] == ["1000_0", "1000_1", "1000_2", "1001_0", "1001_1", "1002",
                                          "1003_0", "1003_1", "1003_2", "1004"]
    # How many tasks report done before each stage counts as completed: every array element and process.
    assert {s: e["tasks"] for s, e in stages.items()} == {
        "shard": 3 + 2 + 1 + 3 + 1, "cpt": 2, "teacher_logits": 3, "distill": 5, "report": 1}
    assert "shard.map: submitted as slurm job 1000_0, 1000_1, 1000_2" in out
    assert "shard.dedup: submitted as slurm job 1001_0, 1001_1" in out
    assert "shard.finish: submitted as slurm job 1004" in out
    assert fake.cancelled == []


@pytest.mark.parametrize(("tasks", "buckets"), [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_shard_arrays_keep_the_stage_resources_and_cluster_and_finish_are_one_process_each_after_the_step_before(
        tmp_path: Path, tasks: int, buckets: int) -> None:
    cfg, run = make_run(tmp_path, ["shard"], f"shard.tasks={tasks}", f"shard.dedup.buckets={buckets}",
                        "shard.resources.nodes=2", "shard.resources.tasks_per_node=2")
    fake = FakeExecutor()
    run_launch(cfg, run, fake)

    map_, dedup, cluster, pack, finish = fake.submissions
    assert fake.names == SHARD_JOBS
    # map and pack: one element per shard task; dedup: one per bucket. An array of one is a plain job.
    for array, size in ((map_, tasks), (dedup, buckets), (pack, tasks)):
        assert array.tasks == size and array.is_array == (size > 1), array.name
        assert [t.element for t in array.spec.tasks] == list(range(size)), array.name  # type: ignore[attr-defined]
        assert (array.resources.nodes, array.resources.tasks_per_node) == (2, 2), array.name  # the stage's own
    for single in (cluster, finish):
        assert single.tasks == 1 and not single.is_array, single.name
        assert [t.element for t in single.spec.tasks] == [None], single.name  # type: ignore[attr-defined]
        assert (single.resources.nodes, single.resources.tasks_per_node) == (1, 1), single.name
    # Each step waits on the whole step before it: an array's base id is afterok on every element.
    assert map_.after == ()
    assert dedup.after == ("1000",) and cluster.after == ("1001",) and pack.after == ("1002",)
    assert finish.after == ("1003",)
    entry = stages_of(run)["shard"]
    assert entry["job_ids"] == [j for s in fake.submissions for j in s.job_ids]
    assert entry["job_ids"][-1] == "1004" and "1002" in entry["job_ids"]
    assert entry["tasks"] == tasks + buckets + 1 + tasks + 1


def test_map_and_pack_arrays_are_no_larger_than_the_input_files(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (inputs / name).write_text('{"text": "x"}\n')
    cfg, run = make_run(tmp_path, ["shard"], "shard.tasks=3", f"shard.inputs=[{json.dumps(str(inputs))}]")
    fake = FakeExecutor()
    run_launch(cfg, run, fake)

    map_, dedup, _, pack, _ = fake.submissions
    # Two files among 3 elements (one file each, largest first) and at most 2 packing groups: a third finds none.
    assert (map_.tasks, dedup.tasks, pack.tasks) == (2, 2, 2)
    assert stages_of(run)["shard"]["tasks"] == 2 + 2 + 1 + 2 + 1


def test_a_large_file_counts_as_its_pieces_in_the_map_and_pack_arrays(tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "big.jsonl").write_text('{"text": "a line of some length"}\n' * 1000)  # 31 kB: 4 pieces of 10 kB
    (inputs / "small.jsonl").write_text('{"text": "x"}\n')
    cfg, run = make_run(tmp_path, ["shard"], "shard.tasks=8", "shard.split_mb=0.01",
                        f"shard.inputs=[{json.dumps(str(inputs))}]")
    fake = FakeExecutor()
    run_launch(cfg, run, fake)
    map_, _, _, pack, _ = fake.submissions
    assert (map_.tasks, pack.tasks) == (5, 5)  # two files, five units


def test_completed_first_stage_is_skipped_and_the_next_waits_on_nothing(tmp_path: Path) -> None:
    cfg, run = make_run(tmp_path, ["shard", "cpt"])
    run.update_stage("shard", status="completed", executor="slurm", tasks=10,
                     job_ids=["900_0", "900_1", "900_2", "901_0", "901_1", "902", "903_0", "903_1", "903_2", "904"])
    before = stages_of(run)["shard"]
    fake = FakeExecutor()
    out = run_launch(cfg, run, fake)

    assert fake.names == ["pipe.cpt.train"]
    assert fake.by_name("pipe.cpt.train").after == ()
    assert stages_of(run)["shard"] == before
    assert fake.state_queries == []  # a completed stage's jobs are not even looked up
    assert "shard: completed earlier, skipped" in out


def test_completed_stage_in_the_middle_is_skipped_and_the_next_waits_on_the_one_before_it(tmp_path: Path) -> None:
    cfg, run = make_run(tmp_path, ["shard", "cpt", "report"])
    run.update_stage("cpt", status="completed", executor="slurm", job_ids=["900"], tasks=2)
    fake = FakeExecutor()
    run_launch(cfg, run, fake)

    assert fake.names == [*SHARD_JOBS, "pipe.report"]
    assert fake.by_name("pipe.report").after == (fake.by_name("pipe.shard.finish").base_id,)
    assert "900" not in fake.by_name("pipe.report").after
    assert stages_of(run)["cpt"]["job_ids"] == ["900"]


ALL_OLD_SHARD = ("500", "501", "502", "503", "504")


@pytest.mark.parametrize(("status", "step_states", "after"), [
    # states of map, dedup, cluster, pack, finish
    ("submitted", ("PENDING", "PENDING", "PENDING", "PENDING", "PENDING"), ALL_OLD_SHARD),
    ("running", ("RUNNING", "PENDING", "PENDING", "PENDING", "PENDING"), ALL_OLD_SHARD),
    ("running", ("COMPLETED", "COMPLETED", "RUNNING", "PENDING", "PENDING"), ("502", "503", "504")),
    ("running", ("COMPLETED", "COMPLETED", "COMPLETED", "COMPLETED", "RUNNING"), ("504",)),  # cpt waits on finish
    ("running", ("COMPLETING", "REQUEUED", "REQUEUED", "PENDING", "PENDING"), ALL_OLD_SHARD),  # not terminal
])
def test_queued_or_running_stage_is_left_alone_and_the_next_stage_chains_on_its_live_jobs(
        tmp_path: Path, status: str, step_states: tuple[str, ...], after: tuple[str, ...]) -> None:
    cfg, run = make_run(tmp_path, ["shard", "cpt"], "shard.tasks=2")
    run.update_stage("shard", status=status, executor="slurm", job_ids=OLD_SHARD_IDS, tasks=SHARD_TASKS)
    before = stages_of(run)["shard"]
    fake = FakeExecutor()
    for ids, state in zip(OLD_SHARD.values(), step_states, strict=True):
        for job_id in ids:
            fake.set_state(job_id, state)
    out = run_launch(cfg, run, fake)

    assert fake.names == ["pipe.cpt.train"]
    assert fake.by_name("pipe.cpt.train").after == after
    assert stages_of(run)["shard"] == before
    assert tuple(OLD_SHARD_IDS) in fake.state_queries
    assert "already queued or running, not resubmitted" in out


def test_launching_again_while_everything_is_queued_submits_nothing(tmp_path: Path) -> None:
    cfg, run = make_run(tmp_path, PIPELINE)
    fake = FakeExecutor()
    run_launch(cfg, run, fake)
    first = stages_of(run)
    fake.set_state(fake.submissions[0].base_id, "RUNNING")
    run_launch(cfg, run, fake)

    assert fake.names == PIPELINE_JOBS  # still once each
    assert stages_of(run) == first


@pytest.mark.parametrize(("status", "sched"), [
    ("failed", "FAILED"),  # a task recorded its error
    ("cancelled", "CANCELLED"),
    ("submitted", "FAILED"),  # killed from outside: the task could not record it
    ("submitted", "CANCELLED"),
    ("running", "TIMEOUT"),
    ("running", "OUT_OF_MEMORY"),
    ("running", "NODE_FAIL"),
    ("running", "COMPLETED"),  # jobs ended but not every task reported done: not completed
    ("submitted", None),  # the scheduler no longer knows the ids (sacct purged, or another cluster)
])
def test_failed_or_ended_stage_is_resubmitted_from_a_clean_entry(tmp_path: Path, status: str,
                                                                 sched: str | None) -> None:
    cfg, run = make_run(tmp_path, ["shard", "cpt"], "shard.tasks=2")
    run.update_stage("shard", status=status, executor="slurm", job_ids=OLD_SHARD_IDS, tasks=SHARD_TASKS,
                     error="map/element-0: ValueError: boom" if status == "failed" else None)
    run.update_stage("shard", task_done="map/element-1")
    fake = FakeExecutor()
    if sched is not None:
        for job_id in OLD_SHARD_IDS:
            fake.set_state(job_id, sched)
    run_launch(cfg, run, fake)

    assert fake.names == [*SHARD_JOBS, "pipe.cpt.train"]
    assert fake.by_name("pipe.shard.map").after == ()  # nothing of the old submission is waited on
    assert fake.by_name("pipe.cpt.train").after == ("1004",)  # the new finish job
    entry = stages_of(run)["shard"]
    assert entry["status"] == "submitted" and entry["error"] is None
    assert entry["job_ids"] == NEW_SHARD_IDS  # the new ids only
    assert entry["past_job_ids"] == OLD_SHARD_IDS
    assert entry["tasks_done"] == [] and entry["tasks"] == SHARD_TASKS


@pytest.mark.parametrize(("recorded", "kind"), [("local", "slurm"), ("slurm", "local")])
def test_jobs_recorded_by_another_executor_kind_are_not_live(tmp_path: Path, recorded: str, kind: str) -> None:
    cfg, run = make_run(tmp_path, ["cpt"])
    run.update_stage("cpt", status="running", executor=recorded, job_ids=["4242"], tasks=2)
    fake = FakeExecutor(kind=kind)
    fake.set_state("4242", "RUNNING")  # the same id means another job to this scheduler
    run_launch(cfg, run, fake)

    assert fake.names == ["pipe.cpt.train"]
    assert not any("4242" in query for query in fake.state_queries)
    entry = stages_of(run)["cpt"]
    assert entry["executor"] == kind and entry["job_ids"] == ["1000"]


@pytest.mark.parametrize("refused", [1, 2, 3, 4])  # dedup, cluster, pack, finish
def test_refused_later_step_marks_the_stage_failed_and_reraises(tmp_path: Path, refused: int) -> None:
    cfg, run = make_run(tmp_path, ["shard", "cpt"], "shard.tasks=2")
    fake = FakeExecutor()
    fake.refuse(SHARD_JOBS[refused], "sbatch: error: invalid partition specified: nope")
    with pytest.raises(SubmissionError, match="invalid partition"):
        run_launch(cfg, run, fake)

    assert fake.names == SHARD_JOBS[:refused]  # nothing after the refused step, and cpt is never submitted
    assert [s.name for s in fake.refused] == [SHARD_JOBS[refused]]
    assert fake.refused[0].after == (str(1000 + refused - 1),)  # the step just before
    stages = stages_of(run)
    assert list(stages) == ["shard"]
    entry = stages["shard"]
    assert entry["status"] == "failed" and "invalid partition specified: nope" in entry["error"]
    # the steps that did go in
    assert entry["finished_at"] and entry["job_ids"] == [j for ids in NEW_SHARD[:refused] for j in ids]


def test_refused_first_step_of_a_later_stage_leaves_the_earlier_stage_submitted(tmp_path: Path) -> None:
    cfg, run = make_run(tmp_path, ["shard", "cpt"])
    fake = FakeExecutor()
    fake.refuse("pipe.cpt.train", "sbatch: error: Requested node configuration is not available")
    with pytest.raises(SubmissionError, match="node configuration"):
        run_launch(cfg, run, fake)

    stages = stages_of(run)
    assert stages["shard"]["status"] == "submitted"
    assert stages["cpt"]["status"] == "failed" and stages["cpt"]["job_ids"] == []
    assert "node configuration is not available" in stages["cpt"]["error"]
    assert fake.refused[0].after == (fake.by_name("pipe.shard.finish").base_id,)

    fake.accept("pipe.cpt.train")  # the cause fixed, launching again submits cpt only, after shard's live jobs
    run_launch(cfg, run, fake)
    assert fake.names == [*SHARD_JOBS, "pipe.cpt.train"]
    assert fake.by_name("pipe.cpt.train").after == ("1000", "1001", "1002", "1003", "1004")
    assert stages_of(run)["cpt"]["status"] == "submitted" and stages_of(run)["cpt"]["error"] is None


def _task_reports_done(job: FakeJob) -> None:
    """What a real StageTask does last, without running its step."""
    task: Any = job.task
    who = f"element-{task.element}" if task.element is not None else "rank-0"
    RunDir(Path(task.run_dir)).update_stage(task.stage, task_done=f"{task.step}/{who}")


def test_waiting_submits_each_stage_without_dependencies_once_the_one_before_completed(tmp_path: Path) -> None:
    cfg, run = make_run(tmp_path, ["probe", "cpt"], "probe.array_size=2", "cpt.resources.tasks_per_node=1")
    fake = FakeExecutor(kind="local", on_results=_task_reports_done)
    out = run_launch(cfg, run, fake, wait=True)

    assert fake.names == ["pipe.probe", "pipe.cpt.train"]
    assert all(s.after == () for s in fake.submissions)  # the local executor has no dependencies
    stages = stages_of(run)
    assert {s: e["status"] for s, e in stages.items()} == {"probe": "completed", "cpt": "completed"}
    assert stages["probe"]["tasks_done"] == ["probe/element-0", "probe/element-1"]
    assert "probe: completed" in out and "cpt: completed" in out


def test_waiting_on_a_failed_job_marks_the_stage_failed_and_submits_nothing_after_it(tmp_path: Path) -> None:
    cfg, run = make_run(tmp_path, ["probe", "cpt"], "probe.array_size=2")
    fake = FakeExecutor(kind="local", on_results=_task_reports_done)
    fake.fail("1000_1", "Traceback (most recent call last):\nValueError: boom")
    with pytest.raises(StageFailed, match=r"stage 'probe' failed in job 1000_1: ValueError: boom"):
        run_launch(cfg, run, fake, wait=True)

    assert fake.names == ["pipe.probe"]
    entry = stages_of(run)["probe"]
    assert entry["status"] == "failed" and entry["error"] == "ValueError: boom" and entry["finished_at"]
    assert "cpt" not in stages_of(run)


def test_waiting_on_jobs_that_end_without_every_task_reporting_fails_the_stage(tmp_path: Path) -> None:
    cfg, run = make_run(tmp_path, ["probe", "cpt"])
    fake = FakeExecutor(kind="local")  # the jobs end but no task says it is done
    with pytest.raises(StageFailed, match=r"stage 'probe' ended with status 'submitted'"):
        run_launch(cfg, run, fake, wait=True)
    assert fake.names == ["pipe.probe"]


def test_resubmitting_a_stage_resubmits_later_stages_still_waiting_on_its_old_jobs(tmp_path: Path) -> None:
    cfg, run = make_run(tmp_path, ["shard", "cpt"], "shard.tasks=2")
    # A pack element failed; Slurm keeps the finish and cpt PENDING (DependencyNeverSatisfied) forever.
    run.update_stage("shard", status="failed", executor="slurm", job_ids=OLD_SHARD_IDS, tasks=SHARD_TASKS,
                     error="pack/element-0: ValueError: boom")
    run.update_stage("cpt", status="submitted", executor="slurm", job_ids=["505"], tasks=2)
    fake = FakeExecutor()
    for job_id in [*OLD_SHARD["map"], *OLD_SHARD["dedup"], *OLD_SHARD["cluster"]]:
        fake.set_state(job_id, "COMPLETED")
    fake.set_state("503_0", "FAILED")
    fake.set_state("503_1", "COMPLETED")
    fake.set_state("504", NEVER_SATISFIED)  # what squeue's reason says of the finish
    fake.set_state("505", "PENDING")  # cpt waits on the finish: dead too once shard is resubmitted
    out = run_launch(cfg, run, fake)

    assert fake.names == [*SHARD_JOBS, "pipe.cpt.train"]
    assert fake.by_name("pipe.cpt.train").after == (fake.by_name("pipe.shard.finish").base_id,)
    assert fake.cancelled == ["504", "505"]  # nothing is left pending on a dead job
    assert fake.state_of("504") == fake.state_of("505") == "CANCELLED"
    stages = stages_of(run)
    assert stages["shard"]["past_job_ids"] == OLD_SHARD_IDS  # never dropped
    assert stages["shard"]["job_ids"] == NEW_SHARD_IDS
    assert stages["cpt"]["past_job_ids"] == ["505"] and stages["cpt"]["job_ids"] == ["1005"]
    assert "cpt: cancelled jobs 505, which waited on jobs of an earlier stage that was resubmitted" in out


def test_an_element_failed_while_its_siblings_run_submits_nothing_and_keeps_their_ids(tmp_path: Path) -> None:
    cfg, run = make_run(tmp_path, ["shard", "cpt"], "shard.tasks=3")
    ids = ["500_0", "500_1", "500_2", "501_0", "501_1", "502", "503_0", "503_1", "503_2", "504"]
    run.update_stage("shard", status="failed", executor="slurm", job_ids=ids, tasks=3 + 2 + 1 + 3 + 1,
                     error="map/element-0: ValueError: boom")
    fake = FakeExecutor()
    for job_id, state in zip(ids, ("FAILED", "RUNNING", "RUNNING", *["PENDING"] * 7), strict=True):
        fake.set_state(job_id, state)
    before = stages_of(run)
    out = run_launch(cfg, run, fake)

    assert fake.names == [] and fake.cancelled == []
    assert stages_of(run) == before  # the running elements' ids stay where cancel and status find them
    # The later steps' PENDING jobs wait on the failed map: they never start, so only the map siblings run on.
    assert "jobs 500_1, 500_2 still run, so nothing is resubmitted" in out


def test_a_failed_map_element_resubmits_the_stage_though_only_the_dedup_is_marked_never_satisfied(
        tmp_path: Path) -> None:
    cfg, run = make_run(tmp_path, ["shard", "cpt"], "shard.tasks=2")
    run.update_stage("shard", status="failed", executor="slurm", job_ids=OLD_SHARD_IDS, tasks=SHARD_TASKS,
                     error="map/element-0: ValueError: boom")
    fake = FakeExecutor()
    fake.set_state("500_0", "FAILED")
    fake.set_state("500_1", "COMPLETED")
    for job_id in OLD_SHARD["dedup"]:
        fake.set_state(job_id, NEVER_SATISFIED)  # Slurm marks only the jobs that wait on the failed one
    for job_id in [*OLD_SHARD["cluster"], *OLD_SHARD["pack"], *OLD_SHARD["finish"]]:
        fake.set_state(job_id, "PENDING")  # reason Dependency: they wait on the dedup, which never starts
    out = run_launch(cfg, run, fake)

    assert fake.names == [*SHARD_JOBS, "pipe.cpt.train"]
    assert sorted(fake.cancelled) == sorted([*OLD_SHARD["dedup"], *OLD_SHARD["cluster"], *OLD_SHARD["pack"],
                                             *OLD_SHARD["finish"]])
    assert stages_of(run)["shard"]["job_ids"] == NEW_SHARD_IDS
    assert "still run" not in out


def test_a_progress_bar_at_the_end_of_a_failed_job_is_never_the_reason(tmp_path: Path) -> None:
    """A job killed from outside cannot record its error: the reason is read from its output."""
    cfg, run = make_run(tmp_path, ["probe"])
    fake = FakeExecutor(kind="local")
    fake.fail("1000", "Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                      "torch.OutOfMemoryError: CUDA out of memory\n"
                      "Loading weights: 100%|██████████| 38/38 [00:00<00:00, 1262.48it/s]\n")
    with pytest.raises(StageFailed, match=r"failed in job 1000: torch.OutOfMemoryError: CUDA out of memory \("):
        run_launch(cfg, run, fake, wait=True)
    assert stages_of(run)["probe"]["error"] == "torch.OutOfMemoryError: CUDA out of memory"


def test_a_stage_stopped_for_requeue_is_reported_as_stopped_with_its_checkpoint_and_the_command(
        tmp_path: Path) -> None:
    cfg, run = make_run(tmp_path, ["cpt", "report"], "cpt.resources.tasks_per_node=1")

    def stop_and_leave(job: FakeJob) -> None:  # what the trainer and its StageTask leave behind on SIGTERM
        run.stage_dir("cpt").mkdir(exist_ok=True)
        run.layout.progress("cpt").write_text(json.dumps({"step": 40, "last_event": "stop", "reason": "signal SIGTERM",
                                                           "path": "step-0000000040"}))
        run.update_stage("cpt", status="stopped")
        raise FailedJobError("Job (task=0) failed during processing with trace:\nLoading weights: 100%|███| 38/38")

    fake = FakeExecutor(kind="local", on_results=stop_and_leave)
    out = io.StringIO()
    with pytest.raises(StageStopped) as stopped:
        launch(cfg, run, fake, wait=True, console=Console(file=out), command="stillroom run mine.toml")
    message = str(stopped.value)
    assert message.startswith("stage 'cpt' stopped at step 40 (signal SIGTERM) and saved its state")
    assert str(run.layout.checkpoints("cpt") / "step-0000000040") in message
    assert message.endswith("Resume it with: stillroom run mine.toml") and "Loading weights" not in message
    assert stages_of(run)["cpt"]["status"] == "stopped" and fake.names == ["pipe.cpt.train"]
    run_launch(cfg, run, FakeExecutor(kind="local", first_id=2000, on_results=_task_reports_done), wait=True)
    assert {s: e["status"] for s, e in stages_of(run).items()} == {"cpt": "completed", "report": "completed"}


def _leave_for_requeue(cfg: RunConfig, layout: Any, env: Any, element: int | None) -> None:
    raise SystemExit(REQUEUE_EXIT_CODE)


def test_a_task_that_leaves_for_requeue_records_its_stage_stopped(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, run = make_run(tmp_path, ["cpt"])
    run.update_stage("cpt", status="submitted", executor="local", job_ids=["1"], tasks=1)
    # The trainer itself is replaced: what is under test is the task's handling of its exit for requeue.
    stages = {**STAGES, "cpt": Stage("cpt", (Step("train", _leave_for_requeue),))}
    monkeypatch.setattr("launcher.stages.STAGES", stages)
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        with pytest.raises(SystemExit):
            StageTask("cpt", "train", str(run.path))()
    finally:  # the task's requeue witness stays installed as the process leaves; this one (pytest) stays
        signal.signal(signal.SIGUSR2, previous)
    entry = stages_of(run)["cpt"]
    assert entry["status"] == "stopped" and entry["stopped_at"] and entry["tasks_done"] == []


def test_an_error_with_brackets_is_printed_as_it_is(tmp_path: Path) -> None:
    """gloo's errors name their source as [/path/pair.cc:553], which rich would read as a closing tag."""
    cfg, run = make_run(tmp_path, ["cpt"])
    error = "train/rank-1: RuntimeError: [/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] closed"
    run.update_stage("cpt", status="failed", executor="slurm", job_ids=["600"], tasks=2, error=error)
    fake = FakeExecutor()
    fake.set_state("600", "RUNNING")
    assert error in run_launch(cfg, run, fake).replace("\n", "")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_job_that_is_not_the_stages_current_submission_leaves_while_the_owner_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Local jobs are named by their controller's pid: this test process stands for the live owner."""
    cfg, run = make_run(tmp_path, ["probe"], "probe.steps=0", "probe.collective=false",
                        "probe.resources.tasks_per_node=1")
    owner = str(os.getpid())
    run.update_stage("probe", status="running", executor="local", job_ids=[owner], tasks=1)
    before = stages_of(run)
    monkeypatch.setenv("SUBMITIT_LOCAL_JOB_ID", str(_dead_pid()))  # an older submission's job, starting late
    assert StageTask("probe", "probe", str(run.path))() is None
    assert f"jobs {owner} are, and still run: leaving without touching the stage" in capsys.readouterr().out
    assert stages_of(run) == before and not run.stage_dir("probe").exists()

    run.update_stage("probe", job_ids=[str(_dead_pid())])  # the recorded owner has ended: this job may work
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        StageTask("probe", "probe", str(run.path))()
    finally:  # a finished task ignores the stop signal from then on; this process (pytest) must not
        signal.signal(signal.SIGUSR2, previous)
    assert stages_of(run)["probe"]["status"] == "completed" and run.stage_dir("probe").exists()
