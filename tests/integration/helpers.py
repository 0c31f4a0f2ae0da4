"""The one home of the integration tests' helpers: drive the real CLI, write run configs, start trainers the
way torchrun does, and read what a run directory holds. Test files import from here, never from each other."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.cli import main
from launcher.layout import RunLayout
from launcher.run_config import load_run_config
from launcher.rundir import RunDir
from launcher.status import refresh
from tests.conftest import free_port
from training.metrics import read_records

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "configs" / "probe.toml"
POLL_S = 0.25  # how often the waits below look again

# The run name each training stage's test configs use: the run directory is <folder>/runs/<name>.
RUN_NAMES = {"cpt": "cpt", "distill": "kd"}

# The uninterrupted cpt run that the resume tests compare against: 30 steps on 2 ranks (ZeRO-2, the default),
# a metrics line every step, evaluations at 10, 20 and 30, a checkpoint every 4 steps. Shared by
# test_cpt.py (ZeRO-2 export, SIGUSR2 resume, 2 -> 1 rank) and test_faults.py (2 nodes -> 1 node);
# mem_gb only sizes the Slurm jobs of the runs compared against it.
CPT_REFERENCE = ("cpt.steps=30", "cpt.eval.every=10", "cpt.log_every=1", "cpt.resources.mem_gb=3")
# The uninterrupted distillation run (live teacher, not sharded): shared by test_distill.py's ZeRO-3
# distillation test and its interrupted-resume test.
DISTILL_REFERENCE = ("distill.steps=16", "distill.log_every=1", "distill.eval.every=8", "distill.teacher_zero3=false")


# ---------------------------------------------------------------------------------------------- the CLI


def cli(*argv: str) -> None:
    assert main(list(argv)) == 0, f"stillroom {' '.join(argv)} failed"


def submit(root: Path, *overrides: str, command: str = "submit") -> RunDir:
    cli(command, str(PROBE), f"run.root={root}", *overrides)
    (run_dir,) = [p for p in root.iterdir() if (p / "state.json").exists()]
    return RunDir(run_dir)


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 180, every: float = POLL_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stage(run: RunDir, name: str = "probe") -> dict[str, Any]:
    return refresh(run)["stages"].get(name, {})  # type: ignore[no-any-return]


def wait_finished(run: RunDir, name: str = "probe", timeout: float = 180) -> dict[str, Any]:
    return wait_for(f"stage {name} to finish", lambda: (e := stage(run, name)).get("status")
                    in ("completed", "failed", "cancelled") and e, timeout)


def reports(run: RunDir, pattern: str = "env-*.json") -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(run.stage_dir("probe").glob(pattern))]


# --------------------------------------------------------------------------------------------- configs


def _toml_value(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, list | tuple):
        value = [str(v) if isinstance(v, Path) else v for v in value]
    return json.dumps(value)  # JSON strings, numbers, booleans and arrays are TOML too


def write_config(path: Path, tables: Mapping[str, Mapping[str, Any]], *extra: str) -> Path:
    """Write a run config: one `[table]` per entry of `tables`, then `extra` TOML lines as they are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for table, values in tables.items():
        lines += [f"[{table}]", *(f"{key} = {_toml_value(value)}" for key, value in values.items())]
    path.write_text("\n".join([*lines, *extra, ""]))
    return path


def shard_config(folder: Path, inputs: Iterable[Path], tokenizer: Path, *extra: str) -> Path:
    """A run config for the shard stage, small enough for tests (seq_len 128, several shards).

    `extra` lines follow the `[shard.reader]` table: keys of that table, or further tables."""
    return write_config(folder / "shard.toml", {
        "run": {"root": folder / "runs", "name": "shard", "stages": ["shard"]},
        "shard": {"inputs": list(inputs), "tokenizer": tokenizer, "seq_len": 128, "val_fraction": 0.1,
                  "shard_sequences": 500},
        "shard.resources": {"time_min": 10, "mem_gb": 2},
        "shard.reader": {"group_field": "group"},
    }, *extra)


def shard(folder: Path, inputs: Iterable[Path], tokenizer: Path, *overrides: str, extra: tuple[str, ...] = ()) -> Path:
    """Run the shard stage of `shard_config(folder, inputs, tokenizer, *extra)` here; its output folder."""
    folder.mkdir(parents=True, exist_ok=True)
    config = shard_config(folder, inputs, tokenizer, *extra)
    assert main(["shard", str(config), *overrides]) == 0
    return folder / "runs" / "shard" / "shard"


def train_config(folder: Path, stage: str, shards: Path, model: Path, *extra: str) -> Path:
    """A run config of one training stage on 2 local ranks: 12 steps of a tiny model, eval every 6 steps,
    a checkpoint every 4. `model` is cpt's base model, or distill's teacher (halved into a 2-layer student,
    trained with ZeRO-3). The run directory is `run_dir(folder, stage)`."""
    section: dict[str, Any] = {"steps": 12, "domain_val": shards}
    model_table: dict[str, Any] = {"dropout": 0.0}
    engine: dict[str, Any] = {"micro_batch": 2, "grad_accum": 2}
    if stage == "cpt":
        section["general_val"] = shards
        model_table = {"path": model, **model_table}
    elif stage == "distill":
        section.update(teacher=model, student_layers=2, temperature=2.0, alpha=0.5)
        engine = {"zero_stage": 3, **engine}
    else:
        raise ValueError(f"not a training stage: {stage!r}")
    return write_config(folder / f"{stage}.toml", {
        "run": {"root": folder / "runs", "name": RUN_NAMES[stage], "stages": [stage]},
        stage: section,
        f"{stage}.model": model_table,
        f"{stage}.data": {"sources": [shards]},
        f"{stage}.optim": {"lr": 1e-3, "warmup_steps": 2},
        f"{stage}.engine": engine,
        f"{stage}.eval": {"every": 6, "batches": 2},
        f"{stage}.checkpoint": {"every_steps": 4},
        f"{stage}.resources": {"tasks_per_node": 2, "time_min": 20},
    }, *extra)


def run_dir(folder: Path, stage: str) -> Path:
    """Where `train_config(folder, stage, ...)` puts its run directory."""
    return folder / "runs" / RUN_NAMES[stage]


# ------------------------------------------------------------------------------------- training processes


def run_trainer(run_dir: Path, world: int, stage: str = "cpt") -> list[subprocess.Popen[bytes]]:
    """The stage's train step in `world` processes started torchrun-style (so signals reach them directly),
    meeting on a port the OS picked."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", "import sys; from launcher.stages import StageTask; "
                                       "StageTask(sys.argv[2], 'train', sys.argv[1])()", str(run_dir), stage],
                                      env=env))
    return procs


@contextmanager
def running_in_background(*argv: str) -> Iterator[subprocess.Popen[bytes]]:
    """`stillroom <argv>` in a process of its own, for CPU work that can overlap a wait on the Slurm
    scheduler; whatever is still running of it when the block ends is killed."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from launcher.cli import main; "
                             "sys.exit(main(sys.argv[1:]))", *argv], start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ------------------------------------------------------------------------------------ the run directory


def records(run_dir: Path, stage: str, *kinds: str) -> list[dict[str, Any]]:
    """The stage's metrics.jsonl records of these kinds (every kind if none), through the project's reader;
    empty while the file does not exist yet (the job is starting)."""
    path = RunLayout(run_dir).metrics(stage)
    if not path.exists():
        return []
    return [r for r in read_records(path, kinds[0] if len(kinds) == 1 else None) if not kinds or r["kind"] in kinds]


def losses(run_dir: Path, stage: str) -> dict[int, float]:
    """Each logged step's training loss."""
    return {r["step"]: r["loss"] for r in records(run_dir, stage, "train")}


def weights(run_dir: Path, stage: str) -> dict[str, Any]:
    """The exported model's tensors (numpy arrays)."""
    from safetensors.numpy import load_file

    return load_file(str(RunLayout(run_dir).export(stage) / "model.safetensors"))


def bitwise_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def wait_for_step(run_dir: Path, stage: str, step: int, timeout: float = 240) -> None:
    """Until the stage has logged the training step `step` (or a later one)."""
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in records(run_dir, stage, "train")):
        assert time.monotonic() < deadline, f"no step {step} in {RunLayout(run_dir).metrics(stage)} after {timeout} s"
        time.sleep(0.05)


# ------------------------------------------------------------------------------ shared reference runs


@dataclass(frozen=True)
class Reference:
    """An uninterrupted `stillroom run` of `train_config(<folder>, stage, shards, model)` with `overrides`,
    computed once per session. Its users only read it: `losses` and `weights` are read-only copies of the
    run's metrics and export, `run_dir` is for reading its export; the fixture fails the session's last user
    if anything the stage wrote under `run_dir` changed."""

    stage: str
    overrides: tuple[str, ...]
    run_dir: Path
    config: Any  # the stage's resolved config section (cfg.cpt or cfg.distill)
    losses: Mapping[int, float]
    weights: Mapping[str, Any]

    def same_training(self, config: Path, overrides: tuple[str, ...] | list[str]) -> bool:
        """Whether `config` with `overrides` trains exactly as this reference did (the same stage section)."""
        return getattr(load_run_config(config, list(overrides)), self.stage) == self.config  # type: ignore[no-any-return]
