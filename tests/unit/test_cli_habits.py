"""Slurm habits on the command line and in config files: overrides anywhere after the command, time limits as
sbatch writes them, --gres, one string where a list of text goes, and `config --docs` readable at 80 columns."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import main
from launcher.config import ConfigError, field_docs, field_types
from launcher.run_config import RunConfig, load_run_config
from slurm.executor import JobSpec, SlurmExecutor
from slurm.resources import Resources, slurm_minutes

PROBE = Path(__file__).resolve().parents[2] / "configs" / "probe.toml"


@pytest.mark.parametrize(("text", "minutes"), [
    ("240", 240), ("04:00:00", 240), ("90:30", 91), ("0:59", 1), ("00:00:30", 1), ("1-12", 2160),
    ("2-00:30", 2910), ("2-00:30:00", 2910), ("1-0:0:1", 1441), (" 45 ", 45)])
def test_time_limits_read_as_sbatch_reads_them(text: str, minutes: int) -> None:
    assert slurm_minutes(text) == minutes  # seconds round up to the next minute, as Slurm's do


@pytest.mark.parametrize("text", ["4h", "1:2:3:4", "-5", "1-", "", "two days", "1.5"])
def test_other_time_texts_are_refused_with_the_formats_named(text: str) -> None:
    with pytest.raises(ValueError, match="is not a time limit: give minutes .* HH:MM:SS, D-HH"):
        slurm_minutes(text)


def test_a_time_limit_as_text_in_an_override_or_a_file_and_a_bad_one_named(tmp_path: Path) -> None:
    assert load_run_config(None, ["resources.time_min=04:00:00"]).resources.time_min == 240
    assert load_run_config(None, ['cpt.resources.time_min="1-12"']).cpt.resources.time_min == 2160
    assert load_run_config(None, ["resources.time_min=90"]).resources.time_min == 90
    config = tmp_path / "c.toml"
    config.write_text('[resources]\ntime_min = "2-00:00:00"\n[probe.resources]\ntime_min = 30\n')
    cfg = load_run_config(config)
    assert (cfg.resources.time_min, cfg.probe.resources.time_min) == (2880, 30)
    with pytest.raises(ConfigError, match=r"^override 'resources.time_min=4h': resources.time_min: '4h' is not"):
        load_run_config(None, ["resources.time_min=4h"])
    config.write_text('[resources]\ntime_min = "tomorrow"\n')
    with pytest.raises(ConfigError, match=rf"^{config}: resources.time_min: 'tomorrow' is not a time limit"):
        load_run_config(config)


def test_one_string_where_a_list_of_text_goes(tmp_path: Path) -> None:
    assert load_run_config(None, ["shard.inputs=data/*.jsonl"]).shard.inputs == ("data/*.jsonl",)
    assert load_run_config(None, ['shard.inputs=["a.jsonl", "b/*.zst"]']).shard.inputs == ("a.jsonl", "b/*.zst")
    config = tmp_path / "c.toml"
    config.write_text('[shard]\ninputs = "corpora/*.jsonl.zst"\n')
    assert load_run_config(config).shard.inputs == ("corpora/*.jsonl.zst",)
    with pytest.raises(ConfigError, match="shard.seq_len must be int"):  # other types stay strict
        load_run_config(None, ["shard.seq_len=2k"])


def _render(**resources: object) -> str:
    spec = JobSpec(name="g", folder=Path("/r/logs/cpt"), resources=Resources(**resources),  # type: ignore[arg-type]
                   tasks=(print,))
    return SlurmExecutor(python="/p").render(spec)


def test_gres_names_a_gpu_type_in_the_sbatch_script_and_cannot_double_the_gpus() -> None:
    text = _render(gres="gpu:a100:4", nodes=2, tasks_per_node=4)
    assert "#SBATCH --gres=gpu:a100:4" in text and "--gpus-per-node" not in text
    assert "--gres" not in _render(gpus_per_node=4)
    assert "#SBATCH --gres=nvme:1" in _render(gres="nvme:1", gpus_per_node=4)  # not GPUs: both may be given
    with pytest.raises(ValueError, match="asks for GPUs and gpus_per_node"):
        Resources(gres="gpu:2", gpus_per_node=2)
    with pytest.raises(ValueError, match="sbatch_extra may not set 'gres'.*resources.gres"):
        Resources(sbatch_extra={"gres": "gpu:1"})
    assert load_run_config(None, ["cpt.resources.gres=gpu:h100:8"]).cpt.resources.gres == "gpu:h100:8"


def test_overrides_go_anywhere_after_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", str(PROBE), "--docs", "--format", "markdown", "probe.steps=7", "resources.nodes=3"]) == 0
    out = capsys.readouterr().out
    assert "| `probe.steps` | int | `7` |" in out and "| `resources.nodes` | int | `3` |" in out
    assert main(["config", str(PROBE), "probe.steps=5", "--docs", "probe.step_seconds=0.5"]) == 0
    out = capsys.readouterr().out
    assert "probe.steps = 5  (int)" in out and "probe.step_seconds = 0.5  (float)" in out
    with pytest.raises(SystemExit) as exit_info:  # a word that is no override is still an error
        main(["config", str(PROBE), "--docs", "stray"])
    assert exit_info.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err


def test_config_docs_fit_80_columns_and_show_every_key_with_its_type(capsys: pytest.CaptureFixture[str],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["config", "--docs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = [line.split(" = ", 1)[0] for line in lines if not line.startswith(" ")]
    assert keys == list(field_types(RunConfig)), "every key, whole, in order"
    too_long = [line for line in lines if len(line) > 80 and (line.startswith("    ") or len(line.split()) > 4)]
    assert not too_long, too_long[:3]
    assert "resources.time_min = 60  (int or Slurm time)" in lines
    assert "cpt.optim.schedule = \"cosine\"  ('cosine' | 'wsd')" in lines
    # A field's comment continued on the comment lines below it is its whole doc.
    assert field_docs(RunConfig)["cpt.model.attention"].endswith("(sdpa where the architecture has it)")


def test_every_override_the_help_and_the_messages_give_as_an_example_is_valid() -> None:
    import re

    from launcher.cli import EXAMPLES

    repo = Path(__file__).resolve().parents[2]
    key = r"((?:run|resources|probe|shard|cpt|teacher_logits|distill|report)(?:\.[a-z_0-9]+)+)=([^\s\"'`]+)"
    found = {m for text in EXAMPLES.values() for m in re.findall(rf"(?<![\w./-]){key}", text)}
    for source in sorted(p for folder in ("launcher", "slurm", "sharding", "training") for p in
                         (repo / folder).glob("*.py")):
        found |= set(re.findall(rf"e\.g\. {key}", source.read_text()))
    assert len(found) >= 5, found  # the search itself finds them
    for dotted, value in sorted(found):
        load_run_config(None, [f"{dotted}={value}"])  # raises ConfigError if the example is not a valid override


TEMPLATE = PROBE.parent / "cluster-template.toml"


def test_a_dry_run_before_the_data_exists_warns_and_prints_every_job_chained(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # The cluster template names data that is not on this machine; the run directory goes to a folder of the test.
    assert main(["submit", str(TEMPLATE), "--dry-run", f"run.root={tmp_path}"]) == 0
    out, err = capsys.readouterr()
    assert "input '/scratch/EDIT_USER/corpora/licenses/*.jsonl.zst' matches no file" in " ".join(err.split())
    assert not list(tmp_path.iterdir()), "a dry run creates nothing"
    from launcher.stages import STAGES

    cfg = load_run_config(TEMPLATE)
    labels = [stage if step.name == stage else f"{stage}.{step.name}"
              for stage in cfg.run.stages for step in STAGES[stage].steps]
    scripts = out.split("#!/bin/bash")[1:]
    assert len(scripts) == len(labels) >= 6
    for i, script in enumerate(scripts):  # each job waits for the one before it, as `submit` chains them
        dependency = [line for line in script.splitlines() if line.startswith("#SBATCH --dependency")]
        assert dependency == ([] if i == 0 else [f"#SBATCH --dependency='afterok:<{labels[i - 1]}>'"]), labels[i]


@pytest.mark.parametrize(("override", "says"), [
    ("cpt.engine.zero_stage=4", "cpt.engine.zero_stage must be 0, 1, 2 or 3"),
    ('run.stages=["cpt", "shard"]', "run.stages must follow the pipeline order"),
])
def test_a_dry_run_still_fails_on_what_is_not_missing_data(override: str, says: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", str(TEMPLATE), "--dry-run", override]) == 2
    assert says in capsys.readouterr().err
