"""What a resume needs besides weights, optimizer state and RNG: the TrainState, saved as JSON in every checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

STATE_VERSION = 2
# Version 1 also had `scheduler`, `best_metric` and `best_step`, never written (the LR is a pure function of the
# step; the best metric lives in `early_stop`): a version-1 state loads with them dropped.
_DROPPED_IN_2 = ("scheduler", "best_metric", "best_step")

@dataclass
class TrainState:
    """Everything a resume needs besides weights and optimizer state, as plain JSON."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen, over all ranks
    loader: dict[str, Any] = field(default_factory=dict)  # opaque, from the data loader
    early_stop: dict[str, Any] = field(default_factory=dict)  # best metric, evals without improvement
    manifest_sha256: list[str] = field(default_factory=list)  # one per data source
    config_sha256: str = ""  # the stage config this state was trained under
    model_fingerprint: str = ""  # the model it started from: a resume onto another model is refused
    tokenizer_sha256: str = ""  # the tokenizer of the data: a resume onto other tokens is refused
    seq_len: int = 0  # packed sequence length: a resume onto another length is refused

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **asdict(self)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        version = d.get("version")
        if version == 1:
            d = {k: v for k, v in d.items() if k not in _DROPPED_IN_2}
        elif version != STATE_VERSION:
            raise ValueError(f"train state version {version!r} is not supported "
                             f"(this code reads 1 and {STATE_VERSION})")
        names = {f.name for f in fields(self)}
        given = set(d) - {"version"}
        # A schema change must bump the version; silently defaulting a field would resume from a wrong state.
        if missing := sorted(names - given):
            raise ValueError(f"train state version {version} lacks fields: {', '.join(missing)}")
        if unknown := sorted(given - names):
            raise ValueError(f"train state version {version} has unknown fields: {', '.join(unknown)}")
        for name in names:
            setattr(self, name, d[name])

    def compatible_with(self, other: TrainState) -> list[str]:
        """Why a resume from `self` (the checkpoint's state) into `other` (this run) must be refused; [] if fine.

        Config and manifest changes are allowed (e.g. a new learning rate); so is another rank count.
        """
        reasons = []
        if self.tokenizer_sha256 != other.tokenizer_sha256:
            reasons.append(f"tokenizer differs: checkpoint {self.tokenizer_sha256[:16] or '?'}, "
                           f"this run {other.tokenizer_sha256[:16] or '?'}")
        if self.seq_len != other.seq_len:
            reasons.append(f"seq_len differs: checkpoint {self.seq_len}, this run {other.seq_len}")
        if self.model_fingerprint != other.model_fingerprint:
            reasons.append(f"model differs: checkpoint {self.model_fingerprint or '?'}, "
                           f"this run {other.model_fingerprint or '?'}")
        return reasons
