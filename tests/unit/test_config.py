from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from launcher.config import ConfigError, config_hash, dump_toml, field_docs
from launcher.run_config import RunConfig, load_run_config
from launcher.rundir import RunDir, RunDirError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def error_of(path: Path | None, overrides: list[str] = []) -> str:  # noqa: B006
    with pytest.raises(ConfigError) as info:
        load_run_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, "config errors are one line"
    return message


def test_unknown_key_names_key_file_and_closest_valid_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[probe.resources]\npartiton = 'gpu'\n")
    message = error_of(path)
    assert str(path) in message
    assert "'probe.resources.partiton'" in message
    assert "did you mean 'probe.resources.partition'" in message


def test_unknown_section(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[prob]\nsteps = 1\n"))
    assert "unknown key 'prob'" in message and "did you mean 'probe'" in message


def test_wrong_type_names_key_file_and_expected_type(tmp_path: Path) -> None:
    path = write(tmp_path, "[resources]\nnodes = 'two'\n")
    message = error_of(path)
    assert str(path) in message and "resources.nodes must be int" in message and '"two"' in message


def test_bool_is_not_an_int_and_int_is_a_float(tmp_path: Path) -> None:
    assert "must be int" in error_of(write(tmp_path, "[probe]\nsteps = true\n"))
    cfg = load_run_config(write(tmp_path, "[resources]\nmem_gb = 2\n"))
    assert cfg.probe.resources.mem_gb == 2.0 and isinstance(cfg.probe.resources.mem_gb, float)


def test_component_check_names_full_key(tmp_path: Path) -> None:
    message = error_of(write(tmp_path, "[probe.resources]\nnodes = 0\n"))
    assert "probe.resources.nodes must be at least 1" in message


def test_invalid_toml_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[run\n")
    assert str(path) in error_of(path) and "not valid TOML" in error_of(path)


def test_overrides_are_typed_and_win_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[probe]\nsteps = 3\n")
    cfg = load_run_config(path, ["probe.steps=7", "run.name=x y", "resources.setup=['module load a']",
                                 "probe.resources.sbatch_extra.exclusive="])
    assert cfg.probe.steps == 7
    assert cfg.run.name == "x y"
    assert cfg.probe.resources.setup == ("module load a",)
    assert cfg.probe.resources.sbatch_extra == {"exclusive": ""}


def test_bad_overrides(tmp_path: Path) -> None:
    assert "expected KEY=VALUE" in error_of(None, ["probe.steps"])
    message = error_of(None, ["probe.stpes=3"])
    assert "override 'probe.stpes=3'" in message and "did you mean 'probe.steps'" in message
    assert "probe.steps must be int, got 'many'" in error_of(None, ["probe.steps=many"])
    assert "must be 'local' | 'slurm'" in error_of(None, ["run.executor=pbs"])


def test_top_level_resources_fill_stage_gaps_but_stage_wins(tmp_path: Path) -> None:
    path = write(tmp_path, "[resources]\npartition = 'a'\nnodes = 2\n[probe.resources]\nnodes = 1\n")
    cfg = load_run_config(path)
    assert cfg.probe.resources.partition == "a" and cfg.probe.resources.nodes == 1
    assert cfg.resources.nodes == 2


def test_every_field_is_documented() -> None:
    undocumented = [key for key, doc in field_docs(RunConfig).items() if not doc]
    assert undocumented == []


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = load_run_config(None, ["run.name=r", 'probe.resources.setup=["echo \\"$HOME\\"", "a\'b"]',
                                 "probe.resources.mem_gb=1.5", "probe.resources.sbatch_extra.comment=x y"])
    path = tmp_path / "resolved.toml"
    path.write_text(dump_toml(cfg, field_docs(RunConfig)))
    again = load_run_config(path)
    assert again == cfg and config_hash(again) == config_hash(cfg)


def test_hash_changes_with_any_value() -> None:
    cfg = RunConfig()
    assert config_hash(cfg) != config_hash(dataclasses.replace(cfg, probe=dataclasses.replace(cfg.probe, steps=1)))


def test_run_dir_refuses_a_changed_config_and_shows_the_difference(tmp_path: Path) -> None:
    root = f"run.root={tmp_path}"
    run = RunDir.create(load_run_config(None, [root, "probe.steps=2"]))
    assert RunDir.create(load_run_config(None, [root, "probe.steps=2"])).path == run.path  # same config: reopened
    with pytest.raises(RunDirError, match=r"probe.steps: 2 -> 3"):
        RunDir.create(load_run_config(None, [root, "probe.steps=3"]))
    assert run.config_path.read_text().startswith("# stillroom resolved config, sha256 ")


def test_run_dir_accepts_changes_of_how_it_runs_and_records_them(tmp_path: Path) -> None:
    root = f"run.root={tmp_path}"
    run = RunDir.create(load_run_config(None, [root, "cpt.resources.nodes=2", "cpt.engine.grad_accum=2"]))
    moved = load_run_config(None, [root, "cpt.resources.nodes=1", "cpt.engine.grad_accum=4", "resources.qos=low"])
    reopened = RunDir.create(moved)
    assert reopened.path == run.path
    assert {"cpt.engine.grad_accum: 2 -> 4", "cpt.resources.nodes: 2 -> 1", 'resources.qos: "" -> "low"',
            'cpt.resources.qos: "" -> "low"'} <= set(reopened.changes)
    assert config_hash(reopened.load_config()) == config_hash(moved) == reopened.read_state()["config_sha256"]
    with pytest.raises(RunDirError, match=r"cpt.steps: .*--new-run"):
        RunDir.create(load_run_config(None, [root, "cpt.steps=7", "cpt.resources.nodes=3"]))


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_resolves(path: Path) -> None:
    cfg = load_run_config(path)
    assert cfg.run.stages, path


def test_reverse_kl_on_a_top_k_cache_needs_the_top_k_norm_before_any_job(tmp_path: Path) -> None:
    from launcher.pipeline import PreflightError, preflight
    from tests.unit.test_preflight import make_model, make_shards

    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": "ours"}')
    teacher, shards = make_model(tmp_path / "teacher", tokenizer), make_shards(tmp_path / "shards", tokenizer)
    inputs = [f"run.root={tmp_path / 'runs'}", f"teacher_logits.teacher={teacher}", f"teacher_logits.source={shards}",
              f"distill.teacher={teacher}", f'distill.data.sources=["{shards}"]']  # the preflight finds them
    stages = "run.stages=['teacher_logits', 'distill']"
    base = [stages, "distill.student_layers=2", "distill.divergence=reverse_kl", "distill.topk_student_norm=vocab",
            *inputs]
    with pytest.raises(PreflightError, match=r"distill: .*topk_student_norm = 'topk'"):
        preflight(load_run_config(None, base))
    preflight(load_run_config(None, [*base, "distill.topk_student_norm=topk"]))
    preflight(load_run_config(None, ["run.stages=['distill']", "distill.student_layers=2",
                                     "distill.divergence=reverse_kl", *inputs]))  # a live teacher: norm does not apply


def test_a_component_check_broken_by_an_override_names_the_override(tmp_path: Path) -> None:
    path = write(tmp_path, "[probe]\nsteps = 3\n")
    assert error_of(path, ["run.name=x", "probe.steps=-1"]) == \
        "override 'probe.steps=-1': probe.steps must not be negative, got -1"
    assert error_of(None, ["resources.nodes=0"]).startswith(  # a top-level default, checked where it lands
        "override 'resources.nodes=0': resources.nodes must be at least 1")
    bad_file = write(tmp_path, "[probe]\nsteps = -3\n")
    assert error_of(bad_file, ["run.name=x"]) == f"{bad_file}: probe.steps must not be negative, got -3"
    assert load_run_config(bad_file, ["probe.steps=2"]).probe.steps == 2  # an override may mend the file
    assert "override 'probe.steps=1\\n2'" in error_of(None, ["probe.steps=1\n2"])  # shown escaped: one line
