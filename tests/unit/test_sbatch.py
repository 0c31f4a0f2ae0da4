"""sbatch rendering: pure string checks (no scheduler involved)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from slurm.executor import JobSpec, SlurmExecutor, SubmissionError, parse_sacct_states
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


# ----------------------------------------------------------------- hostile strings and managed options


def sbatch_options(text: str) -> list[tuple[str, str]]:
    """(option, value) of every line sbatch reads as an option: the #SBATCH block at the top of the script."""
    options = []
    for line in text.splitlines()[1:]:
        if line.startswith("#SBATCH "):
            option, _, value = line.removeprefix("#SBATCH ").partition("=")
            options.append((option, value))
        elif line and not line.startswith("#"):
            break  # sbatch stops reading #SBATCH lines at the first command
    return options


def load_error(overrides: list[str], tmp_path: Path | None = None, toml: str = "") -> str:
    from launcher.config import ConfigError
    from launcher.run_config import load_run_config

    path = None
    if tmp_path is not None:
        path = tmp_path / "cfg.toml"
        path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_run_config(path, overrides)
    assert "\n" not in str(info.value), "config errors are one line"
    return str(info.value)


@pytest.mark.parametrize("field", ["partition", "account", "qos", "constraint"])
@pytest.mark.parametrize("char", ["\n", "\r", "\x00", "\t", "\x1b"])
def test_control_characters_in_sbatch_settings_are_refused(field: str, char: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must not contain control characters"):
        Resources(**{field: f"gpu{char}srun evil"})  # type: ignore[arg-type]


def test_newline_in_a_partition_is_refused_before_sbatch_naming_the_key(tmp_path: Path) -> None:
    message = load_error([], tmp_path, '[cpt.resources]\npartition = "gpu\\necho owned"\n')
    assert message.startswith(f"{tmp_path / 'cfg.toml'}: cpt.resources.partition must not contain control")
    assert "'gpu\\necho owned'" in message  # the value shown escaped
    message = load_error(["resources.partition=gpu\necho owned"])
    assert message.startswith("override 'resources.partition=gpu\\necho owned': resources.partition must not")


def test_newline_in_run_name_or_root_is_refused_naming_the_override(tmp_path: Path) -> None:
    message = load_error(["run.name=a\nb"])
    assert message.startswith("override 'run.name=a\\nb': run.name must not contain control characters")
    message = load_error([f"run.root={tmp_path}\nid"], tmp_path, '[run]\nname = "x"\n')
    assert message.startswith(f"override 'run.root={tmp_path}\\nid': run.root must not contain control")
    assert str(tmp_path / "cfg.toml") not in message, "the override is to blame, not the file"
    message = load_error([], tmp_path, '[run]\nname = "a\\rb"\n')
    assert message.startswith(f"{tmp_path / 'cfg.toml'}: run.name must not contain control")


def test_setup_lines_and_sbatch_extra_may_not_hold_a_newline(tmp_path: Path) -> None:
    message = load_error(['resources.setup=["module load a", "echo ok\\nrm -rf x"]'])
    assert "resources.setup[1] must not contain control characters" in message
    message = load_error([], tmp_path, '[resources.sbatch_extra]\ncomment = "a\\nb"\n')
    assert "resources.sbatch_extra.comment must not contain control characters" in message
    message = load_error([], tmp_path, '[resources.sbatch_extra]\n"exclusive\\n#SBATCH --x" = ""\n')
    assert "resources.sbatch_extra key 'exclusive\\n#SBATCH --x' must not contain control" in message
    message = load_error([], tmp_path, '[resources.sbatch_extra]\n"exclusive --signal" = "USR1@60"\n')
    assert "resources.sbatch_extra key 'exclusive --signal' is not a long sbatch option name" in message


def test_sbatch_extra_may_not_set_the_signal_but_harmless_options_still_render(tmp_path: Path) -> None:
    message = load_error([], tmp_path, '[resources]\nsbatch_extra = {signal = "USR1@60"}\n')
    assert message == (f"{tmp_path / 'cfg.toml'}: resources.sbatch_extra may not set 'signal': "
                       "use resources.signal and resources.signal_lead_s")
    message = load_error(["cpt.resources.sbatch_extra.signal=USR1@60"])
    assert message == ("override 'cpt.resources.sbatch_extra.signal=USR1@60': cpt.resources.sbatch_extra "
                       "may not set 'signal': use resources.signal and resources.signal_lead_s")
    text = render("/r/logs/probe", sbatch_extra={"exclusive": "", "reservation": "r1", "mail_type": "END"})
    options = sbatch_options(text)
    assert ("--exclusive", "") in options and ("--reservation", "r1") in options
    assert ("--mail-type", "END") in options and ("--signal", "USR2@120") in options


@pytest.mark.parametrize(("key", "hint"), [
    ("signal", "use resources.signal and resources.signal_lead_s"),
    ("sig", "use resources.signal and resources.signal_lead_s"),  # sbatch takes abbreviations
    ("time", "use resources.time_min"), ("t", "use resources.time_min"), ("-t", "use resources.time_min"),
    ("nodes", "use resources.nodes"), ("N", "use resources.nodes"),
    ("ntasks_per_node", "use resources.tasks_per_node"), ("ntasks-per-node", "use resources.tasks_per_node"),
    ("n", "use resources.tasks_per_node"), ("ntasks", "use resources.nodes and resources.tasks_per_node"),
    ("cpus_per_task", "use resources.cpus_per_task"), ("c", "use resources.cpus_per_task"),
    ("gpus_per_node", "use resources.gpus_per_node"), ("gpus", "use resources.gpus_per_node"),
    ("mem", "use resources.mem_gb"), ("partition", "use resources.partition"), ("p", "use resources.partition"),
    ("account", "use resources.account"), ("A", "use resources.account"), ("qos", "use resources.qos"),
    ("q", "use resources.qos"), ("constraint", "use resources.constraint"), ("C", "use resources.constraint"),
    ("dependency", "stillroom sets it"), ("d", "stillroom sets it"), ("array", "stillroom sets it"),
    ("a", "stillroom sets it"), ("output", "stillroom sets it"), ("o", "stillroom sets it"),
    ("error", "stillroom sets it"), ("e", "stillroom sets it"), ("requeue", "stillroom sets it"),
    ("no-requeue", "stillroom sets it"), ("job-name", "stillroom sets it"), ("job_name", "stillroom sets it"),
    ("J", "stillroom sets it"), ("open-mode", "stillroom sets it"), ("open_mode", "stillroom sets it"),
    ("wckey", "stillroom sets it"),
])
def test_sbatch_extra_may_not_set_what_stillroom_manages(key: str, hint: str) -> None:
    with pytest.raises(ValueError, match=r"^sbatch_extra may not set") as info:
        Resources(sbatch_extra={key: "1"})
    assert f"'{key}'" in str(info.value) and str(info.value).endswith(hint)


@pytest.mark.parametrize("extra", [{}, {"exclusive": ""}, {"signal": "USR1@60"}, {"sig": "USR1@60"},
                                   {"signal": "USR2@120"}])
def test_a_config_either_fails_to_load_or_renders_exactly_one_signal(tmp_path: Path, extra: dict[str, str]) -> None:
    """End to end: TOML -> RunConfig -> JobSpec -> the sbatch script submitit would submit. sbatch reads any
    unambiguous abbreviation of --signal as --signal, and the signal must be the one submitit's task waits for."""
    from launcher.config import ConfigError
    from launcher.pipeline import job_spec
    from launcher.run_config import load_run_config
    from launcher.rundir import RunDir
    from launcher.stages import STAGES

    table = ", ".join(f'"{k}" = "{v}"' for k, v in extra.items())
    path = tmp_path / "cfg.toml"
    path.write_text(f'[run]\nroot = "{tmp_path / "runs"}"\nstages = ["probe", "cpt"]\n'
                    f'[resources]\nsignal = "USR1"\nsignal_lead_s = 90\nsbatch_extra = {{{table}}}\n')
    try:
        cfg = load_run_config(path)
    except ConfigError as e:
        assert "may not set" in str(e)
        return
    run = RunDir(cfg.run_dir)
    for stage in cfg.run.stages:
        for step in STAGES[stage].steps:
            text = SlurmExecutor(python="/p").render(job_spec(cfg, run, stage, step))
            signals = [value for option, value in sbatch_options(text) if "--signal".startswith(option)
                       and len(option) > 3]
            assert signals == ["USR1@90"], text
            assert "export SUBMITIT_PREEMPT_SIGNAL=USR1\n" in text


def _fake_commands(folder: Path, **scripts: str) -> str:
    """Executables named after the keys, each a shell script: the scheduler's side of the process boundary."""
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.parametrize(("squeue", "sacct", "expected"), [
    # One job that has left the queue: squeue fails ("Invalid job id specified"); sacct says how it ended.
    ("echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1", "echo '294|CANCELLED by 0'",
     {"294": "CANCELLED"}),
    # Queued jobs: squeue wins, and a job that can never start is told apart from one that waits.
    ("echo '300_[0-1]|PENDING|DependencyNeverSatisfied'; echo '301|RUNNING|None'",
     "echo '300_[0-1]|PENDING'; echo '301|RUNNING'",
     {"300_0": "DEPENDENCY_NEVER_SATISFIED", "300_1": "DEPENDENCY_NEVER_SATISFIED", "301": "RUNNING"}),
    # No accounting: the queue alone answers.
    ("echo '302|RUNNING|None'", "echo 'sacct: error: Slurm accounting storage is disabled' >&2; exit 1",
     {"302": "RUNNING"}),
])
def test_job_states_come_from_the_queue_and_from_accounting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          squeue: str, sacct: str, expected: dict[str, str]) -> None:
    monkeypatch.setenv("PATH", _fake_commands(tmp_path / "bin", squeue=squeue, sacct=sacct))
    assert SlurmExecutor().states(list(expected) or ["294"]) == expected


def test_an_unreadable_queue_is_an_error_that_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", _fake_commands(tmp_path / "bin", squeue="echo 'slurmctld: connection refused' >&2; "
                                              "exit 1", sacct="exit 0"))
    with pytest.raises(SubmissionError, match="cannot read job states from the queue .*connection refused"):
        SlurmExecutor().states(["1"])
