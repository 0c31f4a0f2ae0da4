"""Checks the stages' preflights share: folders a stage reads exist or are made by an earlier stage of the run,
model folders are whole (config, weights, tokenizer), shard folders hold the split read. Each raises a ValueError
whose message names the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.missing import MissingInput
from launcher.layout import RunLayout
from launcher.run_config import RunConfig


def preflight_layout(cfg: RunConfig) -> RunLayout:
    return RunLayout(cfg.run_dir.resolve())


def made_earlier(cfg: RunConfig, stage: str, path: str | Path) -> str | None:
    """The stage listed before `stage` in this run whose output `path` is, or None."""
    layout = preflight_layout(cfg)
    outputs = {"shard": layout.stage("shard"), "cpt": layout.export("cpt"),
               "teacher_logits": layout.stage("teacher_logits")}
    target = Path(path).resolve()
    earlier = cfg.run.stages[:cfg.run.stages.index(stage)]
    return next((s for s in earlier if s in outputs and outputs[s].resolve() == target), None)


def not_made(cfg: RunConfig, stage: str, key: str, path: str | Path, what: str) -> ValueError:
    """`key` names a folder that is missing or incomplete (MissingInput); for this run's own output, which no stage
    listed before `stage` makes, a config error saying which stage makes it."""
    layout = preflight_layout(cfg)
    makers = {layout.stage("shard").resolve(): "shard", layout.export("cpt").resolve(): "cpt",
              layout.stage("teacher_logits").resolve(): "teacher_logits"}
    if maker := makers.get(Path(path).resolve()):
        return ValueError(f"{key} is this run's {maker} output {path}, which is not there yet and no earlier stage "
                          f"makes: add '{maker}' to run.stages before '{stage}', or set {key.split(' ')[0]}")
    return MissingInput(f"{key} '{path}' {what}")


def has_tokenizer(folder: str | Path) -> bool:
    """Whether a model folder holds a tokenizer stillroom reads: a tokenizer.json, or a SentencePiece model."""
    return (Path(folder) / "tokenizer.json").is_file() or (Path(folder) / "tokenizer.model").is_file()


def tokenizer_sha256(folder: str | Path) -> str:
    """A model folder's tokenizer fingerprint, as its shards record it (sharding.tokenize: the one definition)."""
    from sharding.tokenize import tokenizer_fingerprint  # tokenizers, and transformers for SentencePiece

    return tokenizer_fingerprint(folder)


def model_config(folder: str | Path) -> dict[str, Any] | None:

    try:
        return json.loads((Path(folder) / "config.json").read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


def check_model(cfg: RunConfig, stage: str, key: str, path: str | Path) -> dict[str, Any] | None:
    """A Hugging Face model folder `stage` reads: config.json, weights and a tokenizer (every stage
    fingerprints the tokenizer from it). Returns its config.json; for this run's cpt export, not there yet,
    the base model's (same shape and tokenizer)."""
    if maker := made_earlier(cfg, stage, path):
        return model_config(cfg.cpt.model.path) if maker == "cpt" else None
    folder = Path(path)
    if not str(path):
        raise ValueError(f"{key} is empty: give a local Hugging Face model folder")
    if not folder.is_dir():
        raise not_made(cfg, stage, key, path, "is not a folder: give a local Hugging Face model folder")
    missing = [name for name, present in (
        ("config.json", (folder / "config.json").is_file()),
        ("weights (*.safetensors, pytorch_model*.bin or their *.index.json)",
         any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
         or any(folder.glob("*.index.json"))),
        ("tokenizer.json or SentencePiece tokenizer.model", has_tokenizer(folder))) if not present]
    if missing:
        raise not_made(cfg, stage, key, path,
                        f"is not a complete Hugging Face model folder: no {', no '.join(missing)}")
    if (config := model_config(folder)) is None:
        raise ValueError(f"{key} '{path}': config.json is not readable JSON")
    return config


def tokenizer_of(cfg: RunConfig, stage: str, model: str | Path) -> Path:
    """The folder whose tokenizer `model` has: this run's cpt export has its base model's."""
    return Path(cfg.cpt.model.path) if made_earlier(cfg, stage, model) == "cpt" else Path(model)


def check_shards(cfg: RunConfig, stage: str, key: str, path: str | Path, split: str) -> tuple[str, int]:
    """A shard folder `stage` reads, holding `split`: (tokenizer sha256, seq_len) of its sequences."""
    from sharding.shards import MANIFEST, Manifest
    from sharding.tokenize import tokenizer_fingerprint

    if made_earlier(cfg, stage, path) == "shard":
        if split == "val" and cfg.shard.val_fraction == 0:
            raise ValueError(f"{key} reads the val split of this run's shards ({path}), "
                             "but shard.val_fraction = 0 holds none out")
        return tokenizer_fingerprint(cfg.shard.tokenizer), cfg.shard.seq_len
    if not (Path(path) / MANIFEST).is_file():
        what = "is not a finished shard folder (no manifest.json)" if Path(path).exists() else "does not exist"
        raise not_made(cfg, stage, key, path, what)
    manifest = Manifest.load(Path(path))
    if not manifest.split_shards(split):
        raise ValueError(f"{key} '{path}' has no {split} split")
    return manifest.tokenizer_sha256, manifest.seq_len


def check_training_inputs(cfg: RunConfig, stage: str, train: Any, model: str | Path) -> None:
    """cpt's or distill's sources and validation sets (resolved in `train`), against each other and `model`'s
    tokenizer: what `open_data` would refuse at the first step."""
    given = cfg.cpt.data.sources if stage == "cpt" else cfg.distill.data.sources
    keys = [f"{stage}.data.sources[{i}]" + ("" if s else ' ("": this run\'s shards)') for i, s in enumerate(given)]
    keys = keys or [f"{stage}.data.sources (empty: this run's shards)"]
    found = {key: (path, check_shards(cfg, stage, key, path, train.data.split))
             for key, path in zip(keys, train.data.sources, strict=True)}
    domain_key = f"{stage}.domain_val" if train.domain_val else f'{stage}.domain_val ("": {keys[0]})'
    vals = {domain_key: train.domain_val or train.data.sources[0]}
    if train.general_val:
        vals[f"{stage}.general_val"] = train.general_val
    found.update({key: (path, check_shards(cfg, stage, key, path, "val")) for key, path in vals.items()})
    tokenizer_dir = tokenizer_of(cfg, stage, model)
    model_sha = tokenizer_sha256(tokenizer_dir) if has_tokenizer(tokenizer_dir) else None
    seq_len = found[keys[0]][1][1]
    for key, (path, (tokenizer, length)) in found.items():
        if model_sha is not None and tokenizer != model_sha:
            raise ValueError(f"{key} '{path}' was tokenized with tokenizer {tokenizer[:12]} but the model's "
                             f"(in {tokenizer_dir}) is {model_sha[:12]}")
        if key in keys and length != seq_len:  # the mixture needs one length; validation sets may differ
            raise ValueError(f"{key} '{path}' has sequences of {length} tokens but {keys[0]} has {seq_len}")
