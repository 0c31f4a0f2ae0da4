"""sbatch rendering: pure string checks (no scheduler involved)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from slurm.executor import JobSpec, SlurmExecutor, parse_sacct_states
from slurm.resources import Resources

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "probe.sbatch"


def noop() -> None:
    """Stands in for a stage task: rendering never calls it."""


def render(folder: str, **resources: object) -> str:
    res = Resources(**resources)  # type: ignore[arg-type]
    spec = JobSpec(name="demo.probe", folder=Path(folder), resources=res, tasks=(noop,), after=("17", "18"))
    return SlurmExecutor(python="/opt/venv/bin/python").render(spec)


def golden_script() -> str:
    return render("/shared/runs/demo/logs/probe", nodes=2, tasks_per_node=4, gpus_per_node=4, cpus_per_task=8,
                  mem_gb=200, time_min=240, partition="gpu", account="proj42", qos="normal", constraint="h100",
                  setup=("module load cuda/12.4", "source /shared/venv/bin/activate"),
                  sbatch_extra={"exclusive": "", "comment": "stillroom test"}, signal_lead_s=300)


def test_sbatch_matches_golden_file() -> None:
    text = golden_script()
    if os.environ.get("STILLROOM_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "sbatch rendering changed; review, then STILLROOM_UPDATE_GOLDEN=1"


def test_array_and_optional_lines() -> None:
    spec = JobSpec(name="a", folder=Path("/r/logs/s"), resources=Resources(array_parallelism=2),
                   tasks=(noop, noop, noop))
    text = SlurmExecutor(python="/p").render(spec)
    assert "#SBATCH --array=0-2%2" in text and "%A_%a_0_log.out" in text
    assert "--gpus-per-node" not in text and "--partition" not in text and "--dependency" not in text


def sbatch_value(text: str, flag: str) -> str:
    # sbatch reads #SBATCH lines with its own shell-like quoting.
    (line,) = [line for line in text.splitlines() if line.startswith(f"#SBATCH --{flag}=")]
    (value,) = shlex.split(line.split("=", 1)[1])
    return value


def test_hostile_paths_stay_quoted(tmp_path: Path) -> None:
    folder = "/runs/my run's \"dir\" $HOME `id` ;rm -rf x/logs/probe"
    text = render(folder, setup=("echo ready",))
    assert sbatch_value(text, "output") == f"{folder}/%j_0_log.out"
    assert sbatch_value(text, "error") == f"{folder}/%j_0_log.err"
    (command,) = [line for line in text.splitlines() if line.startswith("srun ")]
    words = shlex.split(command)
    assert words[words.index("--output") + 1] == f"{folder}/%j_%t_log.out"
    assert words[-1] == folder and words[-4:-1] == ["-u", "-m", "submitit.core._submit"]
    # What bash would do with the command line: print the words instead of running them.
    script = tmp_path / "echo.sh"
    script.write_text("srun() { printf '%s\\n' \"$@\"; }\n" + command.replace("/opt/venv/bin/python", "") + "\n")
    printed = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert printed[-1] == folder and "$HOME" in printed[-1]


def test_parse_sacct_states() -> None:
    text = "12|COMPLETED\n13|CANCELLED by 0\n14_[2-3%1]|PENDING\n14_0|RUNNING\n15|\nnoise\n"
    assert parse_sacct_states(text) == {"12": "COMPLETED", "13": "CANCELLED", "14_2": "PENDING",
                                        "14_3": "PENDING", "14_0": "RUNNING", "15": "UNKNOWN"}
