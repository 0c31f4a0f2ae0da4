"""Every architecture stillroom builds tiny models of, besides the Llama that the other training tests use: trained
by the cpt stage, resumed from its checkpoint, exported, then halved into a student and distilled (ZeRO-3), each
export loaded by transformers and generating. One spawned process runs every stage task of every architecture in
turn, as its own job would, on one rank: what differs between architectures is the model, not the distribution.

Mistral's model has a SentencePiece tokenizer (a tokenizer.model and no tokenizer.json, as Mistral-7B-v0.1 and
Llama-2 ship theirs), which the shard stage and the training stages convert through transformers; the others
have a tokenizer.json."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from launcher.run_config import load_run_config
from launcher.rundir import RunDir
from sharding.corpus import read_corpus
from sharding.shards import Manifest
from sharding.tokenize import tokenizer_fingerprint
from tests.conftest import free_port, one_rank_group
from training.tiny import ARCHITECTURES, build_tiny

from .helpers import records, shard, write_config

pytestmark = pytest.mark.slow

# Llama: every other training test. Qwen3 is built by the same code as Qwen2 here (training.tiny) and its layers
# cut by test_student.py; its own end-to-end run cost the suite ~15 s, so it runs where a session changes it.
ARCHS = [a for a in ARCHITECTURES if a not in ("llama", "qwen3")]
CLASSES = {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM", "gpt2": "GPT2LMHeadModel"}


def _config(folder: Path, arch: str, shards: Path, model: Path) -> Path:
    """cpt (4 steps, a checkpoint every 2) and distill (a 2-layer student of the 3-layer cpt export, ZeRO-3)."""
    def stage(name: str, steps: int, **extra: object) -> dict[str, dict[str, object]]:
        return {name: {"steps": steps, "domain_val": shards, "log_every": 1, **extra},
                f"{name}.model": {"dropout": 0.0}, f"{name}.data": {"sources": [shards]},
                f"{name}.optim": {"lr": 1e-3, "warmup_steps": 1},
                f"{name}.eval": {"every": 2, "batches": 1}, f"{name}.checkpoint": {"every_steps": 2},
                f"{name}.resources": {"tasks_per_node": 1}}

    tables = {"run": {"root": folder / "runs", "name": arch, "stages": ["cpt", "distill"]},
              **stage("cpt", 4), **stage("distill", 2, student_layers=2)}
    tables["cpt.model"]["path"] = model
    tables["distill.engine"] = {"zero_stage": 3}
    return write_config(folder / "run.toml", tables)


def _run_stages(rank: int, port: int, runs: dict[str, tuple[str, str]]) -> None:
    """In the spawned process: per architecture, cpt to step 4, cpt again to step 6 (a resume from step 4's
    checkpoint, the step count raised as a user extending a run would), then the distill stage's two steps."""
    from launcher.stages import StageTask

    os.environ["LOCAL_WORLD_SIZE"] = "1"
    with one_rank_group(port):
        for run_dir, config in runs.values():
            run = RunDir(Path(run_dir))
            run.update_stage("cpt", status="submitted", tasks=1, executor="local")
            StageTask("cpt", "train", run_dir)()
            (run.path / "config.toml").unlink()
            RunDir.create(load_run_config(Path(config), ["cpt.steps=6"]))
            StageTask("cpt", "train", run_dir)()
            run.update_stage("distill", status="submitted", tasks=1, executor="local")
            StageTask("distill", "student", run_dir)()
            StageTask("distill", "train", run_dir)()


def _sentencepiece(texts: list[str], out: Path) -> Path:
    """A SentencePiece BPE model trained on `texts`, in a folder as Llama-2's: tokenizer.model and its config."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=1000, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    out.mkdir(parents=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return out


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory: pytest.TempPathFactory, corpora: dict[str, Path]) -> tuple[Path, Path]:
    """(a tiny Mistral with a SentencePiece tokenizer, the licenses and wiki corpora sharded with its tokenizer).

    The shard stage is pointed at the model folder, as a user points it at Llama-2's: transformers converts a
    SentencePiece model in the light of the folder's config.json too, so the folder is the tokenizer."""
    root = tmp_path_factory.mktemp("sentencepiece")
    texts = [r["text"] for name in ("licenses", "wiki") for r in read_corpus(corpora[name])]
    model = build_tiny("mistral", _sentencepiece(texts, root / "tokenizer"), root / "model", hidden=32, layers=3,
                       kv_heads=2, seed=3)
    # One task: every process of the stage converts the SentencePiece model again (transformers' import included).
    return model, shard(root, [corpora["licenses"], corpora["wiki"]], model, "shard.seq_len=64",
                        "shard.val_fraction=0.2", "shard.tasks=1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, shards: Path, tokenizer_dir: Path,
            sentencepiece_model: tuple[Path, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("architectures")
    runs = {}
    for arch in ARCHS:
        if arch == "mistral":
            model, data = sentencepiece_model
        else:
            model, data = build_tiny(arch, tokenizer_dir / "tokenizer.json", root / arch / "model", hidden=32,
                                     layers=3, kv_heads=None if arch == "gpt2" else 2, seed=3), shards
        config = _config(root / arch, arch, data, model)
        runs[arch] = (str(RunDir.create(load_run_config(config, [])).path), str(config))
    mp.spawn(_run_stages, args=(free_port(), runs), nprocs=1, join=True)  # its own process group
    return {arch: Path(run_dir) for arch, (run_dir, _) in runs.items()}


@pytest.mark.parametrize("arch", ARCHS)
def test_an_architecture_trains_resumes_exports_and_distils(trained: dict[str, Path], arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = trained[arch]
    first = records(out, "cpt", "first_step")
    assert [(r["step"], r["resumed"]) for r in first] == [(1, False), (5, True)], "the second attempt resumed"
    train = records(out, "cpt", "train")
    assert [r["step"] for r in train] == list(range(1, 7)) and all(r["loss"] > 0 for r in train)
    evals = records(out, "cpt", "eval")
    assert evals[0]["base"] and evals[-1]["domain_loss"] < evals[0]["domain_loss"], "training lowers the loss"
    assert records(out, "distill", "train")[-1]["step"] == 2
    tokenizer = AutoTokenizer.from_pretrained(out / "cpt" / "export")
    for stage, layers in (("cpt", 3), ("distill", 2)):
        model = AutoModelForCausalLM.from_pretrained(out / stage / "export")
        assert type(model).__name__ == CLASSES[arch] and model.config.num_hidden_layers == layers, stage
        generated = model.generate(**tokenizer("The licensee", return_tensors="pt"), max_new_tokens=4,
                                   do_sample=False)
        assert generated.shape[1] > 2, stage


def test_a_sentencepiece_tokenizer_is_converted_alike_by_every_stage(sentencepiece_model: tuple[Path, Path],
                                                                      trained: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer, data = sentencepiece_model
    assert (tokenizer / "tokenizer.model").is_file() and not (tokenizer / "tokenizer.json").exists()
    # The shards record the converted tokenizer's fingerprint; the cpt run above trained on them, so the training
    # stage converted the model's tokenizer.model to the same one (open_data refuses shards of another).
    assert Manifest.load(data).tokenizer_sha256 == tokenizer_fingerprint(tokenizer)
    export = trained["mistral"] / "cpt" / "export"
    assert (export / "tokenizer.model").is_file() and not (export / "tokenizer.json").exists()
    assert tokenizer_fingerprint(export) == tokenizer_fingerprint(tokenizer)
    # The ids in the shards are the ones transformers gives the export's users.
    text = "The licensee may copy the Software."
    ids = AutoTokenizer.from_pretrained(export)(text, add_special_tokens=False).input_ids
    from sharding.tokenize import load_tokenizer

    converted, info = load_tokenizer(str(tokenizer))
    assert converted.encode(text, add_special_tokens=False).ids == ids and info.eos_id == 2
