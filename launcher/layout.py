"""Every path of a run directory, in one place (docs/run-directory.md).

    <root>/
      config.toml            resolved config, the sha256 of its canonical form in the first line
      state.json             per stage: status, executor, job ids, tasks done, attempts, timestamps
      .state.lock            held for each read-modify-write of state.json (launcher/lock.py)
      .run.lock              held by submit, run and cancel from reading the state to recording their jobs
      .lock-kind             "flock" or "file": how this run directory locks, decided when it was created
      logs/<stage>/          submitit's folder: one stdout/stderr log per job and task
      <stage>/               what the stage writes, and nothing else writes there
        export/              cpt, distill: the Hugging Face model, COMPLETE inside once whole
        checkpoints/         cpt, distill: step-N/ checkpoints
        metrics.jsonl        cpt, distill: every training event
        progress.json        cpt, distill: the latest numbers, for `stillroom status`
        student-init/        distill: the student made from the teacher's layers, before training

Stages never compute another stage's folder: the launcher resolves what each one reads and writes here and
hands the paths over.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    @property
    def state_lock(self) -> Path:
        return self.root / ".state.lock"

    @property
    def run_lock(self) -> Path:
        return self.root / ".run.lock"

    @property
    def lock_kind(self) -> Path:
        return self.root / ".lock-kind"

    def stage(self, name: str) -> Path:
        return self.root / name

    @property
    def log_root(self) -> Path:
        return self.root / "logs"

    def logs(self, stage: str) -> Path:
        return self.log_root / stage

    def export(self, stage: str) -> Path:
        return self.stage(stage) / "export"

    def checkpoints(self, stage: str) -> Path:
        return self.stage(stage) / "checkpoints"

    def metrics(self, stage: str) -> Path:
        return self.stage(stage) / "metrics.jsonl"

    def progress(self, stage: str) -> Path:
        return self.stage(stage) / "progress.json"

    @property
    def student_init(self) -> Path:
        return self.stage("distill") / "student-init"
