"""The run configuration: one section per component, nested; loaded from TOML plus overrides."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from launcher.config import ConfigError, apply_overrides, build, read_toml
from sharding.config import ShardConfig
from slurm.probe import ProbeConfig
from slurm.resources import Resources, check_text
from training.config import DistillConfig, TeacherLogitsConfig, TrainConfig
from training.report_stage import ReportConfig

# Sections whose `resources` table inherits the top-level [resources] defaults.
STAGE_SECTIONS = ("probe", "shard", "cpt", "teacher_logits", "distill", "report")


@dataclass(frozen=True)
class RunSection:
    name: str = "default"  # run name: the run directory is <root>/<name>
    root: str = "runs"  # folder that holds run directories (on a cluster: shared storage, not /tmp)
    executor: Literal["local", "slurm"] = "local"  # where `stillroom run` runs stages; `submit` always uses slurm
    stages: tuple[str, ...] = ("probe",)  # stages to run, in this order
    dir_mode: str = "0700"  # permissions of a new run directory, octal ("0750": your group may read it too)
    lock: Literal["auto", "flock", "file"] = "auto"  # run-directory locks: probe the filesystem, or force one kind

    def __post_init__(self) -> None:
        if not re.fullmatch(r"0?[0-7]{3}", self.dir_mode) or not int(self.dir_mode, 8) & 0o700 == 0o700:
            raise ValueError(f"dir_mode must be octal permissions that let you in, e.g. '0700', got {self.dir_mode!r}")
        # Both reach the sbatch script (job name, log paths): a newline there would start a shell command.
        check_text("name", self.name)
        check_text("root", self.root)
        if not self.name or "/" in self.name or self.name in {".", ".."}:
            raise ValueError(f"name must be a plain folder name, got {self.name!r}")
        unknown = [s for s in self.stages if s not in STAGE_SECTIONS]
        if unknown:
            raise ValueError(f"stages: unknown stage {unknown[0]!r}; known stages: {', '.join(STAGE_SECTIONS)}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages lists a stage twice: {list(self.stages)}")


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)  # name, location and stages of the run
    resources: Resources = field(default_factory=Resources)  # defaults for every stage's [<stage>.resources]
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # the environment-report stage
    shard: ShardConfig = field(default_factory=ShardConfig)  # raw corpora -> cleaned, packed, verified shards
    cpt: TrainConfig = field(default_factory=TrainConfig)  # continued pretraining with DeepSpeed
    teacher_logits: TeacherLogitsConfig = field(
        default_factory=TeacherLogitsConfig)  # cache the teacher's top-k logits once
    distill: DistillConfig = field(default_factory=DistillConfig)  # a smaller student learns from the teacher
    report: ReportConfig = field(default_factory=ReportConfig)  # base vs teacher vs student, table and plots

    @property
    def run_dir(self) -> Path:
        return Path(self.run.root) / self.run.name

    def stage_resources(self, stage: str) -> Resources:
        return getattr(self, stage).resources  # type: ignore[no-any-return]


def load_run_config(path: Path | None, overrides: list[str] = []) -> RunConfig:  # noqa: B006 (never mutated)
    """Defaults <- TOML file <- `a.b=c` overrides; then [resources] fills each stage's gaps.

    A component's own check that fails because of an override names that override, not the file."""
    raw: dict[str, Any] = read_toml(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    try:
        return _resolve(raw, overrides, source)
    except ConfigError as e:
        raise ConfigError(_one_line(_blame(raw, overrides, source, str(e)))) from None


def _resolve(raw: dict[str, Any], overrides: list[str], source: str) -> RunConfig:
    data = apply_overrides(RunConfig, raw, overrides)
    defaults = data.get("resources", {})
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: resources must be a table (section)")
    for stage in STAGE_SECTIONS:
        section = data.setdefault(stage, {})
        if isinstance(section, dict):
            own = section.get("resources", {})
            section["resources"] = {**defaults, **own} if isinstance(own, dict) else own
    return build(RunConfig, data, source)


def _blame(raw: dict[str, Any], overrides: list[str], source: str, message: str) -> str:
    """`message`, naming the first override that brings it about instead of the file (an error the file has
    on its own stays the file's)."""
    if not overrides or not message.startswith(f"{source}: "):
        return message
    for count in range(len(overrides) + 1):
        try:
            _resolve(raw, overrides[:count], source)
        except ConfigError as e:
            if str(e) == message:
                if count == 0:
                    return message
                return f"override '{overrides[count - 1]}': {message.removeprefix(f'{source}: ')}"
    return message


def _one_line(message: str) -> str:
    """Control characters of a value (an override's newline) shown escaped: config errors are one line."""
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Zl", "Zp") else c for c in message)
