"""What is checked before any job is submitted: value ranges when the config loads (a one-line ConfigError
naming the key, or the override that set it), then the preflight: stage order, and every folder a stage
reads made by an earlier stage of the run or there and whole. Model and shard folders are built by hand;
the shard stage's own refusal of an empty output runs its steps (map, dedup, cluster, pack, finish) in-process on
tiny JSONL inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from launcher.config import ConfigError
from launcher.pipeline import PreflightError, preflight
from launcher.run_config import RunConfig, load_run_config
from sharding.config import ShardConfig
from sharding.shards import Manifest, ShardInfo
from sharding.tokenize import train_bpe_tokenizer

PIPELINE = ["shard", "cpt", "teacher_logits", "distill", "report"]
WORDS = ["amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "iris", "juniper", "kelp", "lagoon",
         "meadow", "nectar", "onyx", "prairie", "quartz", "river", "sable", "tundra", "umber", "violet", "willow"]


def text(n: int) -> str:
    """A distinct short document: no two share enough words to be near duplicates."""
    return " ".join(f"{WORDS[(n * 7 + k * 3) % len(WORDS)]}{n}x{k}" for k in range(12))


def make_model(folder: Path, tokenizer: Path, *, weights: bool = True, tokenizer_json: bool = True,
               layers: int = 4, vocab: int = 300) -> Path:
    """A Hugging Face folder as far as the file check goes: config.json, an empty model.safetensors, tokenizer."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"vocab_size": vocab, "num_hidden_layers": layers}))
    if weights:
        (folder / "model.safetensors").write_bytes(b"")
    if tokenizer_json:
        (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return folder


def make_shards(folder: Path, tokenizer: Path, splits: tuple[str, ...] = ("train", "val"), seq_len: int = 16) -> Path:
    """A finished shard folder's manifest (the preflight reads only that), tokenized with `tokenizer`."""
    folder.mkdir(parents=True)
    infos = tuple(ShardInfo(path=f"{split}-00000.arrow", split=split, rows=4, tokens=4 * seq_len, bytes=1,
                            sha256="0" * 64) for split in splits)
    Manifest(seq_len=seq_len, dtype="uint16", tokenizer_sha256=hashlib.sha256(tokenizer.read_bytes()).hexdigest(),
             tokenizer_path=str(tokenizer), eos_id=0, config_sha256="c", shards=infos).save(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe_tokenizer((text(n) for n in range(200)), 300, tmp_path_factory.mktemp("tokenizer"))


class World:
    """A corpus, a tokenizer, a base model and a general shard folder under tmp_path, and a config using them."""

    def __init__(self, tmp_path: Path, tokenizer: Path) -> None:
        self.root, self.tokenizer = tmp_path, tokenizer
        self.corpus = tmp_path / "corpus.jsonl"
        self.corpus.write_text("".join(json.dumps({"text": text(n)}) + "\n" for n in range(20)))
        self.model = make_model(tmp_path / "base", tokenizer)
        self.general = make_shards(tmp_path / "general", tokenizer)
        self.run_dir = tmp_path / "runs" / "t"

    def overrides(self, stages: list[str] = PIPELINE, *more: str) -> list[str]:
        return [f"run.root={self.root / 'runs'}", "run.name=t", f"run.stages={json.dumps(stages)}",
                f"shard.inputs={json.dumps([str(self.corpus)])}", f"shard.tokenizer={self.tokenizer}",
                "shard.seq_len=16", "shard.val_fraction=0.2", f"cpt.model.path={self.model}",
                f"cpt.general_val={self.general}", f"cpt.data.sources={json.dumps(['', str(self.general)])}",
                "cpt.data.weights=[0.9, 0.1]", "distill.student_layers=2", *more]

    def config(self, stages: list[str] = PIPELINE, *more: str) -> RunConfig:
        return load_run_config(None, self.overrides(stages, *more))

    def refused(self, stages: list[str], *more: str) -> str:
        with pytest.raises(PreflightError) as info:
            preflight(self.config(stages, *more))
        message = str(info.value)
        assert "\n" not in message, "preflight errors are one line"
        return message


@pytest.fixture
def world(tmp_path: Path, tokenizer: Path) -> World:
    return World(tmp_path, tokenizer)


# ------------------------------------------------------------------------------------------- value ranges


@pytest.mark.parametrize(("override", "says"), [
    ("cpt.eval.every=0", "cpt.eval.every must be at least 1, got 0"),
    ("distill.eval.batches=0", "distill.eval.batches must be at least 1"),
    ("cpt.log_every=0", "cpt.log_every must be at least 1, got 0"),
    ("cpt.steps=0", "cpt.steps must be at least 1"),
    ("cpt.checkpoint.keep_last=0", "cpt.checkpoint.keep_last must be at least 1, got 0"),
    ("cpt.checkpoint.every_steps=-1", "cpt.checkpoint.every_steps must be at least 0"),
    ("cpt.checkpoint.every_minutes=-1", "cpt.checkpoint.every_minutes must be at least 0, got -1.0"),
    ("cpt.eval.patience=-1", "cpt.eval.patience must be at least 0, got -1"),
    ("cpt.eval.min_delta=-0.1", "cpt.eval.min_delta must be at least 0"),
    ("cpt.eval.forgetting_pct=-5", "cpt.eval.forgetting_pct must be at least 0"),
    ("cpt.optim.lr=-1e-4", "cpt.optim.lr must be positive, got -0.0001"),
    ("cpt.optim.lr=0", "cpt.optim.lr must be positive"),
    ("distill.optim.lr=nan", "distill.optim.lr must be positive, got nan"),
    ("cpt.optim.warmup_steps=-1", "cpt.optim.warmup_steps must be at least 0, got -1"),
    ("cpt.optim.min_lr_ratio=5", "cpt.optim.min_lr_ratio must be in [0, 1], got 5.0"),
    ("cpt.optim.decay_fraction=0", "cpt.optim.decay_fraction must be in (0, 1]"),
    ("cpt.optim.weight_decay=-0.1", "cpt.optim.weight_decay must be at least 0"),
    ("cpt.optim.beta1=1", "cpt.optim.beta1 must be in [0, 1), got 1.0"),
    ("cpt.optim.beta2=-0.5", "cpt.optim.beta2 must be in [0, 1)"),
    ("cpt.optim.eps=0", "cpt.optim.eps must be positive"),
    ("cpt.optim.grad_clip=-1", "cpt.optim.grad_clip must be at least 0"),
    ("cpt.model.dropout=1.5", "cpt.model.dropout must be in [0, 1)"),
    ("distill.temperature=inf", "distill.temperature must be positive"),
    ("teacher_logits.k=0", "teacher_logits.k must be at least 1"),
    ("report.max_rows=0", "report.max_rows must be at least 1, got 0"),
    ("report.batch=0", "report.batch must be at least 1, got 0"),
    ("probe.fail_rank=-2", "probe.fail_rank must be a rank or -1 (none), got -2"),
    ("probe.step_seconds=nan", "probe.step_seconds must not be negative"),
    ("shard.threads=-1", "shard.threads must not be negative, got -1"),
    ("shard.clean.quality.max_dup_5gram=nan", "shard.clean.quality.max_dup_5gram must not be negative"),
    ("shard.clean.quality.min_mean_word_length=20", "min_mean_word_length must not exceed max_mean_word_length"),
    ("resources.mem_gb=-1", "resources.mem_gb must be 0 or more, got -1.0"),
    ("cpt.resources.time_min=1", "cpt.resources.signal_lead_s (120) must be shorter than time_min (1 min = 60 s)"),
])
def test_value_ranges_are_one_line_errors_naming_the_override(override: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config(None, [override])
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"override '{override}': ")
    assert says in message


def test_jsd_and_skew_kl_bound_beta() -> None:
    with pytest.raises(ConfigError, match=r"distill.beta must be in \(0, 1\), got 0.0"):
        load_run_config(None, ["distill.divergence=jsd", "distill.beta=0"])
    with pytest.raises(ConfigError, match=r"distill.beta must be in \[0, 1\), got 1.0"):
        load_run_config(None, ["distill.divergence=skew_kl", "distill.beta=1"])
    load_run_config(None, ["distill.divergence=skew_kl", "distill.beta=0"])
    load_run_config(None, ["distill.divergence=jsd"])  # the default beta 0.5
    load_run_config(None, ["distill.beta=1"])  # forward_kl does not use beta


def test_a_range_error_in_a_file_names_the_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "cfg.toml"
    path.write_text("[cpt.eval]\nevery = 0\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path, ["cpt.steps=5"])
    assert str(info.value) == f"{path}: cpt.eval.every must be at least 1, got 0"
    path.write_text('[cpt.engine.overrides]\n"zero_optimization..stage" = "1"\n')
    with pytest.raises(ConfigError, match=r"cpt.engine.overrides: 'zero_optimization..stage' is not a dotted"):
        load_run_config(path)


# ------------------------------------------------------------------------------------- order and wiring


def test_a_valid_pipeline_passes_and_stages_must_run_in_pipeline_order(world: World) -> None:
    preflight(world.config())
    preflight(world.config(["probe", *PIPELINE]))
    preflight(world.config(["shard", "probe", "cpt", "report"]))  # probe anywhere
    message = world.refused(["cpt", "shard"])
    assert message.startswith("run.stages must follow the pipeline order shard, cpt, teacher_logits, distill, report")
    assert "'shard' is listed after 'cpt'" in message
    assert "'cpt' is listed after 'distill'" in world.refused(["shard", "distill", "cpt"])
    assert "'distill' is listed after 'report'" in world.refused(["report", "distill"])


def test_this_runs_shards_need_the_shard_stage_or_a_finished_folder(world: World) -> None:
    message = world.refused(["cpt"])
    assert message == (f"cpt: cpt.data.sources[0] (\"\": this run's shards) is this run's shard output "
                       f"{world.run_dir / 'shard'}, which is not there yet and no earlier stage makes: add 'shard' to "
                       "run.stages before 'cpt', or set cpt.data.sources[0]")
    message = world.refused(["cpt"], "cpt.data.sources=[]", "cpt.data.weights=[]")
    assert message.startswith("cpt: cpt.data.sources (empty: this run's shards) is this run's shard output ")
    explicit = f"cpt.data.sources={json.dumps([str(world.run_dir / 'shard')])}"  # spelled out: the same folder
    assert "add 'shard' to run.stages before 'cpt'" in world.refused(["cpt"], explicit, "cpt.data.weights=[]")
    preflight(world.config(["shard", "cpt"], explicit, "cpt.data.weights=[]"))
    make_shards(world.run_dir / "shard", world.tokenizer)  # an earlier `stillroom shard` of this run
    preflight(world.config(["cpt"]))


def test_a_missing_or_empty_validation_folder_is_refused(world: World) -> None:
    missing = world.root / "nowhere"
    message = world.refused(["shard", "cpt"], f"cpt.general_val={missing}")
    assert message == f"cpt: cpt.general_val '{missing}' does not exist"
    no_val = make_shards(world.root / "train-only", world.tokenizer, splits=("train",))
    assert world.refused(["shard", "cpt"], f"cpt.domain_val={no_val}") == \
        f"cpt: cpt.domain_val '{no_val}' has no val split"
    message = world.refused(["shard", "cpt"], "shard.val_fraction=0")
    assert message.startswith("cpt: cpt.domain_val (\"\": cpt.data.sources[0] (\"\": this run's shards)) reads the "
                              "val split of this run's shards") and "shard.val_fraction = 0" in message
    (world.root / "half").mkdir()
    assert world.refused(["shard", "cpt", "report"], f"report.general_val={world.root / 'half'}") == \
        f"report: report.general_val '{world.root / 'half'}' is not a finished shard folder (no manifest.json)"


@pytest.mark.parametrize(("weights", "tokenizer_json", "says"), [
    (False, True, "no weights (*.safetensors, pytorch_model*.bin or their *.index.json)"),
    (True, False, "no tokenizer.json or SentencePiece tokenizer.model"),
    (False, False, "no weights (*.safetensors, pytorch_model*.bin or their *.index.json), "
                   "no tokenizer.json or SentencePiece tokenizer.model"),
])
def test_model_folders_need_config_weights_and_tokenizer(world: World, weights: bool, tokenizer_json: bool,
                                                         says: str) -> None:
    partial = make_model(world.root / "partial", world.tokenizer, weights=weights, tokenizer_json=tokenizer_json)
    expected = f"'{partial}' is not a complete Hugging Face model folder: {says}"
    assert world.refused(["shard", "cpt"], f"cpt.model.path={partial}") == f"cpt: cpt.model.path {expected}"
    assert world.refused(["shard", "cpt", "distill"], f"distill.teacher={partial}") == \
        f"distill: distill.teacher {expected}"
    assert world.refused(["shard", "cpt", "distill"], "distill.student_layers=0", f"distill.model.path={partial}") \
        == f"distill: distill.model.path {expected}"
    assert world.refused(["shard", "cpt", "report"], f"report.base={partial}") == f"report: report.base {expected}"
    only_config = world.root / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_text("{}")
    assert "no weights" in world.refused(["shard", "cpt"], f"cpt.model.path={only_config}")
    assert world.refused(["shard", "cpt"], f"cpt.model.path={world.root / 'none'}") == \
        f"cpt: cpt.model.path '{world.root / 'none'}' is not a folder: give a local Hugging Face model folder"
    assert world.refused(["shard", "cpt"], "cpt.model.path=") == \
        "cpt: cpt.model.path is empty: give a local Hugging Face model folder"
    index_only = make_model(world.root / "sharded-weights", world.tokenizer, weights=False)
    (index_only / "model.safetensors.index.json").write_text("{}")
    preflight(world.config(["shard", "cpt"], f"cpt.model.path={index_only}"))


def test_a_teacher_of_this_run_needs_cpt(world: World) -> None:
    make_shards(world.run_dir / "shard", world.tokenizer)
    message = world.refused(["distill"])
    assert message.startswith("distill: distill.teacher (\"\": this run's cpt export) is this run's cpt output ")
    assert "add 'cpt' to run.stages before 'distill', or set distill.teacher" in message
    message = world.refused(["teacher_logits"])
    assert message.startswith("teacher_logits: teacher_logits.teacher (\"\": this run's cpt export) is this run's "
                              "cpt output") and "add 'cpt' to run.stages before 'teacher_logits'" in message
    preflight(world.config(["distill"], f"distill.teacher={world.model}"))
    preflight(world.config(["teacher_logits", "distill"], f"teacher_logits.teacher={world.model}",
                           f"distill.teacher={world.model}", "distill.data.sources=[]"))


def test_teacher_logits_needs_this_runs_shards_or_a_source(world: World) -> None:
    message = world.refused(["teacher_logits"], f"teacher_logits.teacher={world.model}")
    assert message.startswith("teacher_logits: teacher_logits.source (\"\": this run's shards) is this run's shard")
    assert "add 'shard' to run.stages before 'teacher_logits'" in message
    preflight(world.config(["teacher_logits"], f"teacher_logits.teacher={world.model}",
                           f"teacher_logits.source={world.general}"))
    assert world.refused(["teacher_logits"], f"teacher_logits.teacher={world.model}",
                         f"teacher_logits.source={world.general}", "teacher_logits.k=301") == \
        "teacher_logits: teacher_logits.k = 301 exceeds the teacher's vocabulary of 300"


def test_the_report_needs_a_base_model(world: World) -> None:
    make_shards(world.run_dir / "shard", world.tokenizer)
    assert world.refused(["report"], "cpt.model.path=") == \
        "report: report needs a base model: set report.base (or cpt.model.path)"
    preflight(world.config(["report"]))  # "": cpt.model.path
    preflight(world.config(["report"], "cpt.model.path=", f"report.base={world.model}"))


def test_sources_must_share_the_models_tokenizer_and_seq_len(world: World, tmp_path: Path) -> None:
    other = train_bpe_tokenizer((f"other words {n}" for n in range(100)), 280, tmp_path / "other-tokenizer")
    foreign = make_shards(world.root / "foreign", other)
    message = world.refused(["shard", "cpt"], f"cpt.general_val={foreign}")
    assert message.startswith(f"cpt: cpt.general_val '{foreign}' was tokenized with tokenizer ")
    longer = make_shards(world.root / "longer", world.tokenizer, seq_len=32)
    assert world.refused(["shard", "cpt"], f"cpt.data.sources={json.dumps(['', str(longer)])}") == \
        f"cpt: cpt.data.sources[1] '{longer}' has sequences of 32 tokens but cpt.data.sources[0] (\"\": this run's " \
        "shards) has 16"


def test_a_student_fits_its_teacher(world: World) -> None:
    assert world.refused(["shard", "cpt", "distill"], "distill.student_layers=5") == \
        "distill: distill.student_layers = 5 exceeds the teacher's 4 layers"
    assert "a student keeps at least the first and the last layer" in world.refused(
        ["shard", "cpt", "distill"], "distill.student_layers=1")


def test_distillation_from_this_runs_cache_reads_what_was_cached(world: World) -> None:
    stages = ["shard", "cpt", "teacher_logits", "distill"]
    message = world.refused(stages, f"distill.data.sources={json.dumps([str(world.general)])}")
    assert message.startswith(f"distill: distill.data.sources[0] '{world.general}' is not the token source this "
                              "run's teacher_logits caches")
    message = world.refused(stages, f"distill.teacher={world.model}")
    assert message.startswith(f"distill: distill.teacher '{world.model}' is not the teacher this run's "
                              "teacher_logits runs")
    message = world.refused(stages, f"distill.data.sources={json.dumps(['', str(world.general)])}")
    assert "aligned with one token source; distill.data.sources gives 2" in message
    assert "is not a finished teacher-logits cache (no COMPLETE)" in world.refused(
        ["shard", "cpt", "distill"], f"distill.topk_cache={world.root / 'cache'}")


def test_earlier_dedup_rounds_must_be_finished_shard_folders(world: World) -> None:
    assert world.refused(["shard"], f"shard.dedup.previous={json.dumps([str(world.general)])}") == \
        f"shard: shard.dedup.previous[0] '{world.general}' is not a finished shard folder (no dedup-index/index.json)"


def test_dry_run_runs_the_preflight(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.cli import main

    path = world.root / "cfg.toml"
    path.write_text("")
    assert main(["submit", str(path), *world.overrides(["cpt", "shard"]), "--dry-run"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the resolved config
    assert "run.stages must follow the pipeline order" in last and "'shard' is listed after 'cpt'" in last


# ------------------------------------------------------------------------- the shard stage's own output


def shard_config(tmp_path: Path, tokenizer: Path, *overrides: str) -> tuple[ShardConfig, Path]:
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": text(n)}) + "\n" for n in range(12)))
    cfg = load_run_config(None, [f"shard.inputs={json.dumps([str(inputs)])}", f"shard.tokenizer={tokenizer}",
                                 "shard.seq_len=16", "shard.val_fraction=0.2", "shard.shard_sequences=8",
                                 'shard.clean.steps=["normalize"]', "shard.encode_batch=4", "shard.threads=1",
                                 *overrides]).shard
    return cfg, tmp_path / "shard"


def run_shard(cfg: ShardConfig, out: Path) -> dict[str, object]:
    from sharding.reduce import run_all

    return run_all(cfg, out, "data-hash")  # map, dedup, cluster, pack, finish: the finish refuses


def test_a_shard_stage_that_keeps_no_document_fails_with_its_accounting(tmp_path: Path, tokenizer: Path) -> None:
    cfg, out = shard_config(tmp_path, tokenizer, 'shard.clean.steps=["normalize", "quality"]')
    with pytest.raises(RuntimeError) as info:
        run_shard(cfg, out)
    message = str(info.value)
    assert message.startswith("shard: no document survived cleaning and deduplication (12 documents read from 1 "
                              "file(s), 0 kept; dropped: quality.")
    assert "\n" not in message and not (out / "COMPLETE").exists() and not (out / "manifest.json").exists()


def test_an_empty_validation_split_fails_the_shard_stage(tmp_path: Path, tokenizer: Path) -> None:
    cfg, out = shard_config(tmp_path, tokenizer, "shard.val_fraction=0.001")
    with pytest.raises(RuntimeError) as info:
        run_shard(cfg, out)
    message = str(info.value)
    assert message.startswith("shard: the val split is empty (0 documents, 0 tokens: not one sequence of seq_len 16)")
    assert "raise shard.val_fraction" in message and "12 documents read from 1 file(s), 12 kept" in message
    assert not (out / "COMPLETE").exists() and not (out / "manifest.json").exists()
    for folder, fraction in (("ok", "0.2"), ("no-val", "0")):  # a val split; none asked for, so none needed
        (tmp_path / folder).mkdir()
        cfg, out = shard_config(tmp_path / folder, tokenizer, f"shard.val_fraction={fraction}")
        assert run_shard(cfg, out)["docs_kept"] == 12 and (out / "COMPLETE").exists()
        assert bool(Manifest.load(out).split_shards("val")) == (fraction != "0")
