from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sharding.shards import Manifest, ShardWriter
from sharding.tokenize import Packer, load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer
from training.report import report_table, write_report
from training.tiny import build_tiny_llama

PNG = b"\x89PNG\r\n\x1a\n"
SEQ_LEN = 32
MAX_ROWS = 13  # fewer than the 20 val rows, and not a multiple of the batch: the last batch is partial


def sentences(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["the", "kiln", "fires", "glaze", "at", "noon", "while", "potters", "watch", "clay", "cracks", "slowly"]
    return [" ".join(rng.choice(words, size=int(rng.integers(4, 12)))) + "." for _ in range(n)]


def make_val_set(folder: Path, tokenizer_json: Path, seed: int, rows: int = 20) -> Path:
    tokenizer, info = load_tokenizer(str(tokenizer_json))
    packer = Packer(SEQ_LEN, info.eos_id, np.dtype(np.uint16))
    packed = [packer.add(np.array(tokenizer.encode(text).ids)) for text in sentences(400, seed)]
    folder.mkdir(parents=True)
    writer = ShardWriter(folder / "val-00000.arrow", SEQ_LEN, np.dtype(np.uint16), "val")
    writer.write(np.concatenate(packed)[:rows])
    Manifest(seq_len=SEQ_LEN, dtype="uint16", tokenizer_sha256=tokenizer_fingerprint(str(tokenizer_json)),
             tokenizer_path=str(tokenizer_json), eos_id=info.eos_id, config_sha256="c",
             shards=(writer.close(),)).save(folder)
    return folder


def write_metrics(path: Path, offset: float) -> Path:
    lines = [{"kind": "eval", "step": 0, "domain_loss": 5.0 + offset, "general_loss": 5.5, "base": True}]
    lines += [{"kind": "train", "step": s, "loss": 6.0 - s / 10 + offset, "lr": 1e-3} for s in range(1, 11)]
    lines += [{"kind": "eval", "step": s, "domain_loss": 5.0 - s / 10, "general_loss": 5.5} for s in (5, 10)]
    path.write_text("\n".join(json.dumps(line) for line in lines) + '\n{"kind": "train", "st')  # torn last line
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    # One intra-op thread: on a busy 2-core CI machine two spinning OpenMP threads per pass are several times
    # slower than one, and these models are far too small to gain from more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("report")
    tokenizer = train_bpe_tokenizer(sentences(300, seed=1), 300, root / "tok")
    models = {"base": build_tiny_llama(tokenizer, root / "base", hidden=64, layers=4, seed=2),
              "teacher": build_tiny_llama(tokenizer, root / "teacher", hidden=64, layers=4),
              "student": build_tiny_llama(tokenizer, root / "student", hidden=64, layers=2, seed=1)}
    # Different text per set, so a report that mixed the sets up would fail the perplexity check.
    val_sets = {name: make_val_set(root / name, tokenizer, seed) for seed, name in enumerate(("domain", "general"))}
    metrics = {"cpt": write_metrics(root / "cpt.jsonl", 0.0), "distill": write_metrics(root / "kd.jsonl", 0.5)}
    out = root / "out"
    results = write_report(models, val_sets, out, max_rows=MAX_ROWS, batch=4, metrics=metrics)
    yield {"root": root, "models": models, "val_sets": val_sets, "out": out, "results": results}
    torch.set_num_threads(threads)


def test_report_files_and_numbers(setup: dict[str, Any]) -> None:
    out, results = setup["out"], setup["results"]
    for name in ("results.json", "report.md", "index.html", "perplexity.png", "speed_size.png", "curves.png"):
        assert (out / name).is_file(), name
    for name in ("perplexity.png", "speed_size.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    assert not list(out.glob(".*tmp*")), "temp files left behind"
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["models"]["teacher"]["path"] == str(setup["models"]["teacher"])
    assert saved["val_sets"]["domain"] == {"path": str(setup["val_sets"]["domain"]), "rows": MAX_ROWS,
                                           "seq_len": SEQ_LEN, "tokenizer_sha256": saved["val_sets"]["domain"][
                                               "tokenizer_sha256"]}
    assert saved["device"].startswith("cpu: ") and saved["dtype"] == "float32" and saved["load_avg_1m"] >= 0
    assert saved["models"]["student"]["ppl"]["domain"] != saved["models"]["student"]["ppl"]["general"]
    for m in saved["models"].values():
        assert m["forward_tokens"] == 2 * MAX_ROWS * SEQ_LEN and m["forward_passes"] == 2 * 4  # 13 rows: 4+4+4+1
        assert m["forward_tokens_per_s"] > 0 and m["generate_tokens_per_s"] > 0 and m["generate_new_tokens"] == 32


def test_perplexity_params_and_size_match_an_independent_computation(setup: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    from training.data import OpenedSource

    results = setup["results"]["models"]
    source = OpenedSource(setup["val_sets"]["general"], split="val")
    ids = torch.from_numpy(np.stack([source.get(i) for i in range(MAX_ROWS)]).astype(np.int64))
    model = AutoModelForCausalLM.from_pretrained(setup["models"]["student"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                                           ids[:, 1:].reshape(-1))
    assert results["student"]["ppl"]["general"] == pytest.approx(math.exp(float(ce)), rel=1e-4)
    assert results["student"]["params"] == sum(p.numel() for p in model.parameters())
    teacher, student = results["teacher"], results["student"]
    assert student["params"] < teacher["params"] and student["size_bytes"] < teacher["size_bytes"]
    weights = (setup["models"]["teacher"] / "model.safetensors").stat().st_size
    assert teacher["size_bytes"] == weights


def test_markdown_html_ratios_and_console_table(setup: dict[str, Any]) -> None:
    out, results = setup["out"], setup["results"]
    ratios = results["ratios"]
    s, t = results["models"]["student"], results["models"]["teacher"]
    assert ratios["student_teacher_ppl"]["domain"] == pytest.approx(s["ppl"]["domain"] / t["ppl"]["domain"])
    # The speed-up comes from the side-by-side rounds, not from the table's one-model-at-a-time columns.
    side = results["side_by_side"]
    assert side["rounds"] == 4
    for kind in ("forward", "generate"):
        by = side["tokens_per_s"][kind]
        assert set(by) == {"teacher", "student"} and all(len(v) == 4 and min(v) > 0 for v in by.values())
        assert ratios[f"student_speedup_{kind}"] == pytest.approx(
            statistics.median(by["student"]) / statistics.median(by["teacher"]))
    b = results["models"]["base"]
    assert ratios["teacher_vs_base_ppl_pct"]["general"] == pytest.approx(
        100 * (t["ppl"]["general"] / b["ppl"]["general"] - 1))
    md = (out / "report.md").read_text()
    assert "| model | params (M) | size (MB) | ppl domain | ppl general | tokens/s forward |" in md
    assert "student/teacher perplexity on general" in md and "student speedup vs teacher" in md
    assert "teacher vs base perplexity on domain" in md
    page = (out / "index.html").read_text()
    assert page.count("<tr>") == 4 and '<img src="curves.png"' in page and "ppl general" in page
    table = report_table(results)
    assert table.row_count == 3 and len(table.columns) == 7


def test_model_with_another_tokenizer_is_refused_before_loading(setup: dict[str, Any], tmp_path: Path) -> None:
    other = train_bpe_tokenizer(sentences(300, seed=2), 280, tmp_path / "tok")
    stranger = shutil.copytree(setup["models"]["student"], tmp_path / "stranger")
    shutil.copy2(other, stranger / "tokenizer.json")
    with pytest.raises(ValueError, match=r"^model stranger \(.*\) has tokenizer \w{12} but val set domain "
                                         r"\(.*\) was tokenized with \w{12}$"):
        write_report({"stranger": stranger}, setup["val_sets"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_curves_without_metrics_and_no_ratios_without_their_models(setup: dict[str, Any], tmp_path: Path) -> None:
    results = write_report({"student": setup["models"]["student"]}, {"domain": setup["val_sets"]["domain"]},
                           tmp_path / "out", max_rows=2, batch=2)
    assert results["images"] == ["perplexity.png", "speed_size.png"] and results["ratios"] == {}
    assert "side_by_side" not in results
    assert not (tmp_path / "out" / "curves.png").exists()
    assert "<img" in (tmp_path / "out" / "index.html").read_text()


def test_missing_matplotlib_fails_fast_naming_the_install(setup: dict[str, Any], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    with pytest.raises(ImportError, match="pip install matplotlib"):
        write_report(setup["models"], setup["val_sets"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
