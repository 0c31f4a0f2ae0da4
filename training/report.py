"""Model comparison report: perplexity, size and speed of base, teacher and student on held-out val splits.

`write_report` evaluates every model on the same rows of every val set and writes, into one folder:
results.json (all numbers and the inputs' paths), report.md, index.html (plain HTML, needs nothing but a
browser) and PNG charts. Throughput is measured on the machine that runs the report, so it is only
comparable between models of one report, never across reports run on other hardware. The student's speed-up
over the teacher comes from a separate side-by-side measurement (`_side_by_side`) with both models loaded.
"""

from __future__ import annotations

import gc
import html
import io
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from common.publish import publish_bytes, publish_json
from sharding.shards import Manifest
from sharding.tokenize import tokenizer_fingerprint
from training.data import OpenedSource

PROMPT_TOKENS = 32  # greedy generation benchmark: a fixed prompt of this many tokens ...
NEW_TOKENS = 32  # ... continued by exactly this many new tokens
GENERATE_RUNS = 3  # timed generate runs per model; the median is reported
SIDE_BY_SIDE_ROUNDS = 4  # student-vs-teacher speed: alternating rounds of one forward and one generate each
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _figure(**kwargs: Any) -> Any:
    """A matplotlib Figure drawn with Agg. pyplot is never imported: it would switch the process-wide
    backend and may try to open a display; a bare Figure with an Agg canvas has no global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the report's charts need matplotlib: pip install matplotlib") from None
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any, path: Path) -> None:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    publish_bytes(path, buffer.getvalue())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    # platform.processor() is often just "x86_64" (or empty) on Linux; lscpu knows the marketing name.
    if shutil.which("lscpu"):
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")]
            if names:
                return f"cpu: {names[0]}"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return f"cpu: {platform.processor() or platform.machine() or 'unknown'}"


def _check_tokenizers(models: Mapping[str, Path], manifests: Mapping[str, Manifest],
                      val_sets: Mapping[str, Path]) -> None:
    # Perplexities over token ids of another tokenizer are meaningless numbers, not merely worse ones.
    for name, folder in models.items():
        fingerprint = tokenizer_fingerprint(str(folder))
        for set_name, manifest in manifests.items():
            if manifest.tokenizer_sha256 != fingerprint:
                raise ValueError(f"model {name} ({folder}) has tokenizer {fingerprint[:12]} but val set {set_name} "
                                 f"({val_sets[set_name]}) was tokenized with {manifest.tokenizer_sha256[:12]}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: stop the clock only when they are done


def _timed(device: torch.device, fn: Any) -> tuple[Any, float]:
    _sync(device)
    began = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - began


def _generation(model: Any, rows: Mapping[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, dict]:
    """The generation benchmark's prompt and arguments: the same work for every model."""
    prompt = torch.cat(list(rows.values())).reshape(-1)[:PROMPT_TOKENS][None].to(device)
    if prompt.shape[1] < PROMPT_TOKENS:
        raise ValueError(f"the val sets hold fewer than {PROMPT_TOKENS} tokens: too few for the generation prompt")
    # min_new_tokens: an early EOS must not shorten the run, or models would be timed on different work.
    return prompt, {"attention_mask": torch.ones_like(prompt), "do_sample": False, "max_new_tokens": NEW_TOKENS,
                    "min_new_tokens": NEW_TOKENS, "pad_token_id": model.config.eos_token_id}


def _evaluate(model: Any, rows: Mapping[str, torch.Tensor], batch: int, device: torch.device) -> dict[str, Any]:
    loss: dict[str, float] = {}
    rates: list[float] = []  # tokens/s of each forward pass
    # Warm-up at the timed shapes, untimed: the first calls pay one-off costs (thread pools, allocator growth,
    # kernel selection) that would otherwise land on whichever model happens to be evaluated first.
    model(input_ids=next(iter(rows.values()))[:batch].to(device))
    for set_name, ids in rows.items():
        total, predicted = 0.0, 0
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch].to(device)
            out, seconds = _timed(device, lambda c=chunk: model(input_ids=c, labels=c))
            n = chunk.shape[0] * (chunk.shape[1] - 1)  # labels shift by one inside the model
            total, predicted = total + float(out.loss) * n, predicted + n
            rates.append(chunk.numel() / seconds)
        loss[set_name] = total / predicted  # token-weighted: every row has seq_len tokens, none padded
    prompt, kwargs = _generation(model, rows, device)
    model.generate(prompt, **kwargs)  # warm-up, as above
    runs = [_timed(device, lambda: model.generate(prompt, **kwargs)) for _ in range(GENERATE_RUNS)]
    new_tokens = runs[0][0].shape[1] - PROMPT_TOKENS
    # Medians, not totals: on a shared machine one descheduled pass would otherwise decide the comparison.
    return {"loss": loss, "ppl": {k: math.exp(v) if v < 700 else math.inf for k, v in loss.items()},
            "forward_tokens": sum(len(ids) * ids.shape[1] for ids in rows.values()), "forward_passes": len(rates),
            "forward_tokens_per_s": statistics.median(rates), "generate_new_tokens": new_tokens,
            "generate_tokens_per_s": statistics.median(new_tokens / seconds for _, seconds in runs)}


def _load(folder: Path, dtype: torch.dtype, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def _side_by_side(folders: Mapping[str, Path], rows: Mapping[str, torch.Tensor], batch: int, dtype: torch.dtype,
                  device: torch.device) -> dict[str, Any]:
    """Speed of the student against the teacher, both loaded, their timed passes interleaved in ABBA order.
    Timed one model after the other, a slow spell of a shared machine lands on one model only (the forward
    ratio of one pair measured 1.53x and 1.74x in two runs); interleaved, it lands on both."""
    models = {name: _load(folders[name], dtype, device) for name in ("teacher", "student")}
    generation = {name: _generation(model, rows, device) for name, model in models.items()}
    chunk = next(iter(rows.values()))[:batch].to(device)
    samples: dict[str, dict[str, list[float]]] = {kind: {n: [] for n in models} for kind in ("forward", "generate")}
    with torch.no_grad():
        for name, model in models.items():  # warm-up, untimed, as in _evaluate
            model(input_ids=chunk)
            model.generate(generation[name][0], **generation[name][1])
        for round_ in range(SIDE_BY_SIDE_ROUNDS):
            for name in list(models)[:: 1 if round_ % 2 == 0 else -1]:
                model, (prompt, kwargs) = models[name], generation[name]
                _, seconds = _timed(device, lambda m=model: m(input_ids=chunk))
                samples["forward"][name].append(chunk.numel() / seconds)
                out, seconds = _timed(device, lambda m=model, p=prompt, k=kwargs: m.generate(p, **k))
                samples["generate"][name].append((out.shape[1] - prompt.shape[1]) / seconds)
    del models
    gc.collect()
    speedup = {kind: statistics.median(by["student"]) / statistics.median(by["teacher"])
               for kind, by in samples.items()}
    return {"rounds": SIDE_BY_SIDE_ROUNDS, "tokens_per_s": samples, "speedup": speedup}


def _ratios(models: Mapping[str, Any], sets: list[str], side_by_side: Mapping[str, Any] | None) -> dict[str, Any]:
    """The comparisons the pipeline exists for, where the report has the models they need."""
    ratios: dict[str, Any] = {}
    if "student" in models and "teacher" in models:
        s, t = models["student"], models["teacher"]
        ratios["student_teacher_ppl"] = {k: s["ppl"][k] / t["ppl"][k] for k in sets}
    if side_by_side:
        ratios["student_speedup_forward"] = side_by_side["speedup"]["forward"]
        ratios["student_speedup_generate"] = side_by_side["speedup"]["generate"]
    if "teacher" in models and "base" in models:
        t, b = models["teacher"], models["base"]
        ratios["teacher_vs_base_ppl_pct"] = {k: 100.0 * (t["ppl"][k] / b["ppl"][k] - 1.0) for k in sets}
    return ratios


def _num(x: float) -> str:
    return f"{x:,.2f}" if abs(x) >= 1 else f"{x:.3g}"


def _table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows shared by the Markdown, HTML and console tables."""
    sets = list(results["val_sets"])
    header = ["model", "params (M)", "size (MB)", *(f"ppl {s}" for s in sets), "tokens/s forward",
              f"tokens/s generate ({NEW_TOKENS} new)"]
    rows = [[name, _num(m["params"] / 1e6), _num(m["size_bytes"] / 1e6), *(_num(m["ppl"][s]) for s in sets),
             _num(m["forward_tokens_per_s"]), _num(m["generate_tokens_per_s"])]
            for name, m in results["models"].items()]
    return header, rows


def _ratio_lines(ratios: Mapping[str, Any]) -> list[str]:
    lines = [f"student/teacher perplexity on {k}: {v:.3f}" for k, v in ratios.get("student_teacher_ppl", {}).items()]
    if "student_speedup_forward" in ratios:
        lines.append(f"student speedup vs teacher (measured side by side): forward "
                     f"x{ratios['student_speedup_forward']:.2f}, generate x{ratios['student_speedup_generate']:.2f}")
    lines += [f"teacher vs base perplexity on {k}: {v:+.1f}%"
              for k, v in ratios.get("teacher_vs_base_ppl_pct", {}).items()]
    return lines


def report_table(results: dict[str, Any]) -> Table:
    header, rows = _table(results)
    table = Table(title=f"stillroom report on {results['device']}")
    for i, column in enumerate(header):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _markdown(results: dict[str, Any], images: list[str]) -> str:
    header, rows = _table(results)
    lines = [f"# stillroom report\n\nDevice: {results['device']} ({results['dtype']}); perplexity over the first "
             f"{results['max_rows']} val rows of each set.\n", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows), ""]
    lines += [f"- {line}" for line in _ratio_lines(results["ratios"])]
    return "\n".join(lines + ["", *(f"![{name}]({name})" for name in images)]) + "\n"


def _html(results: dict[str, Any], images: list[str]) -> str:
    header, rows = _table(results)
    e = html.escape
    cells = "\n".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    ratios = "".join(f"<li>{e(line)}</li>" for line in _ratio_lines(results["ratios"]))
    return ("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>stillroom report</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #999;padding:4px 8px;text-align:right}td:first-child{text-align:left}"
            "</style></head><body>\n<h1>stillroom report</h1>\n"
            f"<p>Device: {e(results['device'])} ({e(results['dtype'])}); perplexity over the first "
            f"{results['max_rows']} val rows of each set.</p>\n<table><tr>"
            + "".join(f"<th>{e(h)}</th>" for h in header) + f"</tr>\n{cells}\n</table>\n<ul>{ratios}</ul>\n"
            + "".join(f"<p><img src=\"{e(name)}\" alt=\"{e(name)}\"></p>\n" for name in images)
            + "</body></html>\n")


def _plot_perplexity(results: dict[str, Any], path: Path) -> None:
    figure = _figure(figsize=(7, 4))
    ax = figure.add_subplot()
    sets, names = list(results["val_sets"]), list(results["models"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        bars = ax.bar([j + i * width for j in range(len(sets))], [results["models"][name]["ppl"][s] for s in sets],
                      width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(sets))], sets)
    ax.set_ylabel("perplexity (lower is better)")
    ax.legend()
    _png(figure, path)


def _plot_speed_size(results: dict[str, Any], path: Path) -> None:
    # One panel per quantity: batched forward runs orders of magnitude faster than token-by-token generation,
    # so on a shared axis the generation bars would be invisible.
    figure = _figure(figsize=(12, 4))
    names, models = list(results["models"]), results["models"]
    panels = (("params", 1e6, "parameters (M)"), ("forward_tokens_per_s", 1, "tokens/s, forward (batched)"),
              ("generate_tokens_per_s", 1, f"tokens/s, greedy generate ({NEW_TOKENS} new)"))
    for i, (key, scale, label) in enumerate(panels):
        ax = figure.add_subplot(1, 3, i + 1)
        ax.bar_label(ax.bar(names, [models[n][key] / scale for n in names]), fmt="%.3g", fontsize=8)
        ax.set_ylabel(label)
    figure.suptitle(f"size and speed on {results['device']} ({results['threads']} threads)")
    _png(figure, path)


def _read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """series name -> step -> value. A resumed run re-logs the steps after its last checkpoint: the later
    line wins, as it is the one that led to the final model. A torn last line (killed mid-write) is skipped."""
    series: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = record.get("kind")
        keys = ["loss"] if kind == "train" else [k for k in record if k.endswith("_loss")] if kind == "eval" else []
        for key in keys:
            if isinstance(record.get(key), int | float) and isinstance(record.get("step"), int):
                label = "train loss" if kind == "train" else f"val {key.removesuffix('_loss')} loss"
                series.setdefault(label, {})[record["step"]] = float(record[key])
    return series


def _plot_curves(metrics: Mapping[str, Path], path: Path) -> None:
    figure = _figure(figsize=(5 * len(metrics), 4))  # one panel per stage: each stage counts steps from 0
    for i, (stage, file) in enumerate(metrics.items()):
        ax = figure.add_subplot(1, len(metrics), i + 1)
        for label, points in _read_metrics(Path(file)).items():
            steps = sorted(points)
            ax.plot(steps, [points[s] for s in steps], marker="" if label == "train loss" else "o", label=label)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    _png(figure, path)


def write_report(models: Mapping[str, Path], val_sets: Mapping[str, Path], out: Path, *, max_rows: int = 64,
                 batch: int = 8, device: str = "cpu", metrics: Mapping[str, Path] | None = None) -> dict[str, Any]:
    """Evaluate `models` (name -> local HF folder) on the val split of `val_sets` (name -> shard folder),
    write results.json, report.md, index.html and charts into `out`; return the results."""
    if not models or not val_sets or max_rows < 1 or batch < 1:
        raise ValueError("need at least one model and one val set, max_rows >= 1 and batch >= 1")
    _figure()  # fail before minutes of evaluation, not after, when matplotlib is missing
    manifests = {name: Manifest.load(Path(folder)) for name, folder in val_sets.items()}
    _check_tokenizers(models, manifests, val_sets)
    rows: dict[str, torch.Tensor] = {}
    for name, folder in val_sets.items():
        source = OpenedSource(folder, split="val", name=name)
        if source.rows == 0:
            raise ValueError(f"val set {name} ({folder}) has no rows in its val split")
        rows[name] = torch.stack([torch.from_numpy(source.get(i).astype("int64"))
                                  for i in range(min(max_rows, source.rows))])
        source.close()
    dev = torch.device(device)
    # fp32 on CPU (bf16 matmuls there are slow and emulated); bf16 on GPUs that have it, as models are served.
    dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    results: dict[str, Any] = {
        # The load average tells a reader whether other work on the machine may have skewed the timings.
        "device": device_name(dev), "threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
        "dtype": str(dtype).removeprefix("torch."),
        "max_rows": max_rows, "batch": batch, "generate_prompt_tokens": PROMPT_TOKENS, "models": {},
        "val_sets": {name: {"path": str(val_sets[name]), "rows": len(ids), "seq_len": ids.shape[1],
                            "tokenizer_sha256": manifests[name].tokenizer_sha256} for name, ids in rows.items()},
        "metrics": {stage: str(path) for stage, path in (metrics or {}).items()}}
    for name, folder in models.items():
        model = _load(folder, dtype, dev)
        with torch.no_grad():
            measured = _evaluate(model, rows, batch, dev)
        results["models"][name] = {
            "path": str(folder), "params": sum(p.numel() for p in model.parameters()),
            "size_bytes": sum(f.stat().st_size for f in Path(folder).iterdir() if f.suffix in WEIGHT_SUFFIXES),
            **measured}
        del model  # one model in memory at a time: a teacher and its base may not fit together
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if "teacher" in models and "student" in models:
        results["side_by_side"] = _side_by_side(models, rows, batch, dtype, dev)
    results["ratios"] = _ratios(results["models"], list(rows), results.get("side_by_side"))
    out.mkdir(parents=True, exist_ok=True)
    _plot_perplexity(results, out / "perplexity.png")
    _plot_speed_size(results, out / "speed_size.png")
    images = ["perplexity.png", "speed_size.png"]
    if metrics:
        _plot_curves(metrics, out / "curves.png")
        images.append("curves.png")
    results["images"] = images
    publish_bytes(out / "report.md", _markdown(results, images).encode())
    publish_bytes(out / "index.html", _html(results, images).encode())
    publish_json(out / "results.json", results)  # last: its presence means the report is complete
    return results
