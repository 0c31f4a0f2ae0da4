"""Training loop overhead, measured side by side in one run on the same model, config and data.

    .venv/bin/python benchmarks/train_overhead.py [--steps 40] [--hidden 256] [--layers 4] [--rounds 3]

Figures (goal):
  stillroom steps/s / a bare DeepSpeed loop's, 2 processes, gloo, ZeRO-2     (>= 0.95)
  time blocked on the loader / step time                                     (<= 1%)
  loader resume time at the far end of a 10^8-token dataset                  (<= 1 s)
  save-on-signal: SIGUSR2 to both ranks -> checkpoint written -> exit        (<= 5 s)

The bare loop is deepspeed.initialize with stillroom's generated DeepSpeed config, the same tiny
Llama and batches already in memory, and nothing else: no schedule, logging, evaluation or
checkpoints. stillroom's rate comes from its own metrics (from the first optimizer step to the
last, evaluation at the start and the end excluded). The loader is synchronous, so the time the
loop is blocked on it is the time `next_batch` takes, measured for the same batches.

The two loops run interleaved, bare then stillroom, round after round (ABAB...): this machine's speed drifts by
more than the difference sought (a bare loop measured 0.91 steps/s before a stillroom run and 1.05 after it), so
the ratio is that of the medians, and rounds are added (up to --max-rounds) until the last two ratios of medians
agree within 2%.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import emit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BARE = r"""
import json, os, sys, time, numpy as np, torch
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed
from launcher.run_config import load_run_config
from training.data import MixedStream, OpenedSource
from training.engine import build_engine, load_model
cfg = load_run_config(__import__("pathlib").Path(sys.argv[1])).cpt
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
stream = MixedStream([OpenedSource(p) for p in cfg.data.sources], cfg.data.weights, cfg.data.seed)
B, A = cfg.engine.micro_batch, cfg.engine.grad_accum
batches = []
for step in range(cfg.steps):
    batches.append([torch.from_numpy(stream.next_batch(m, rank, world, B, A)[0]) for m in range(A)])
    stream.advance(B * A * world)
engine = build_engine(cfg, load_model(cfg.model.path, "fp32", dropout=0.0), False)
start = time.perf_counter()
for step_batches in batches:
    for x in step_batches:
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
elapsed = time.perf_counter() - start
if rank == 0:
    print(json.dumps({"steps_per_s": cfg.steps / elapsed}))
"""


def free_port() -> int:
    """A port the OS just handed out, for one rendezvous (fixed ports collide with whatever else runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torch_env(rank: int, world: int, port: int) -> dict[str, str]:
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1"}


def spawn(args: list[str], world: int, port: int) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen([sys.executable, *args], env=torch_env(r, world, port), text=True,
                             stdout=subprocess.PIPE) for r in range(world)]


def prepare(work: Path, hidden: int, layers: int, steps: int, docs: int | None = None) -> Path:
    """Shards of the licenses corpus (its first `docs`), a tokenizer and a tiny Llama; returns the run config."""
    from launcher.config import config_hash
    from launcher.run_config import load_run_config
    from sharding.corpus import build_corpus, read_corpus
    from sharding.reduce import run_all
    from sharding.tokenize import train_bpe_tokenizer
    from training.tiny import build_tiny_llama

    corpus = build_corpus("licenses", work / "corpora", limit=docs)
    tokenizer = train_bpe_tokenizer((r["text"] for r in read_corpus(corpus)), 4096, work / "tokenizer")
    shard_cfg = load_run_config(None, [f"shard.inputs=[{json.dumps(str(corpus))}]", f"shard.tokenizer={tokenizer}",
                                       "shard.seq_len=256", "shard.val_fraction=0.05", "shard.tasks=1"]).shard
    (work / "shards").mkdir()
    run_all(shard_cfg, work / "shards", config_hash(shard_cfg.data_config()))
    model = build_tiny_llama(tokenizer, work / "model", hidden=hidden, layers=layers, heads=4, max_positions=256)
    config = work / "cpt.toml"
    config.write_text("\n".join([
        "[run]", f'root = "{work}/runs"', 'name = "bench"', 'stages = ["cpt"]',
        "[cpt]", f"steps = {steps}", "log_every = 1",
        # The bare loop feeds plain rows: document masking (its cost is benchmarks/doc_mask_cost.py's) is off.
        "[cpt.model]", f'path = "{model}"', "dropout = 0.0", "document_mask = false",
        "[cpt.data]", f'sources = ["{work}/shards"]',
        "[cpt.engine]", "zero_stage = 2", "micro_batch = 4", "grad_accum = 2",
        "[cpt.eval]", f"every = {steps * 10}", "batches = 1",
        "[cpt.checkpoint]", "every_steps = 0", "every_minutes = 0",
        "[cpt.resources]", "tasks_per_node = 2", "signal_lead_s = 1", ""]))
    return config


def stillroom_run(config: Path, port: int, signal_at: int = 0,
                  stage: str = "cpt") -> tuple[list[dict[str, object]], float | None]:
    """Run a training stage in 2 processes; with `signal_at`, SIGUSR2 both ranks then and time until they exit."""
    from launcher.run_config import load_run_config
    from launcher.rundir import RunDir

    run = RunDir.create(load_run_config(config))
    run.update_stage(stage, status="submitted", tasks=2, executor="local")
    task = "import sys; from launcher.stages import StageTask; StageTask(sys.argv[2], 'train', sys.argv[1])()"
    procs = spawn(["-c", task, str(run.path), stage], 2, port)
    log, exit_s = run.path / stage / "metrics.jsonl", None
    if signal_at:
        while not (log.exists() and f'"kind": "train", "step": {signal_at},' in log.read_text()):
            time.sleep(0.01)
        sent = time.perf_counter()
        for p in procs:
            p.send_signal(signal.SIGUSR2)
        for p in procs:
            p.wait()
        exit_s = time.perf_counter() - sent
    for p in procs:
        p.wait()
    return [json.loads(line) for line in log.read_text().splitlines()], exit_s


def loader_seconds(config: Path) -> float:
    from launcher.run_config import load_run_config
    from training.data import MixedStream, OpenedSource

    cfg = load_run_config(config).cpt
    stream = MixedStream([OpenedSource(p) for p in cfg.data.sources], cfg.data.weights, cfg.data.seed)
    start = time.perf_counter()
    for _ in range(cfg.steps):
        for m in range(cfg.engine.grad_accum):
            stream.next_batch(m, 0, 2, cfg.engine.micro_batch, cfg.engine.grad_accum)
        stream.advance(cfg.engine.micro_batch * cfg.engine.grad_accum * 2)
    return time.perf_counter() - start


def far_resume_seconds(work: Path, tokens: int = 10**8, seq_len: int = 2048) -> float:
    """Shards of `tokens` random tokens; seconds to restore a loader state near their end and read a batch."""
    import numpy as np

    from sharding.shards import Manifest, ShardWriter
    from training.data import MixedStream, OpenedSource

    folder = work / "big"
    folder.mkdir()
    rows, per_shard = tokens // seq_len, 8192
    rng, infos = np.random.default_rng(0), []
    for first in range(0, rows, per_shard):
        writer = ShardWriter(folder / f"train-{first // per_shard:05d}.arrow", seq_len, np.dtype(np.uint16), "train")
        writer.write(rng.integers(0, 50000, (min(per_shard, rows - first), seq_len), dtype=np.uint16))
        infos.append(writer.close())
    Manifest(seq_len=seq_len, dtype="uint16", tokenizer_sha256="-", tokenizer_path="-", eos_id=0,
             config_sha256="-", shards=tuple(infos)).save(folder)
    state = MixedStream([OpenedSource(folder)]).state_dict()
    state["samples_consumed"] = rows - 16
    state["per_source"] = [rows - 16]
    start = time.perf_counter()
    stream = MixedStream([OpenedSource(folder)])
    stream.load_state_dict(state)
    stream.next_batch(0, 0, 1, 8, 1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="bare/stillroom pairs at least (default 3)")
    parser.add_argument("--max-rounds", type=int, default=6, help="and at most, until the ratio is stable")
    args = parser.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = prepare(work, args.hidden, args.layers, args.steps)
        bares, ours_all, ratios = [], [], []
        while len(bares) < args.max_rounds:
            i = len(bares)
            bares.append(json.loads(spawn(["-c", BARE, str(config)], 2, free_port())[0].communicate()[0]
                                    .splitlines()[-1])["steps_per_s"])
            round_config = work / f"cpt-{i}.toml"  # a run directory of its own per round
            round_config.write_text(config.read_text().replace('name = "bench"', f'name = "bench-{i}"'))
            records, _ = stillroom_run(round_config, free_port())
            train = [r for r in records if r["kind"] == "train"]
            ours_all.append(float(train[-1]["tokens_per_s"]) / (4 * 2 * 2 * 256))  # type: ignore[arg-type]
            ratios.append(statistics.median(ours_all) / statistics.median(bares))
            print(f"round {i + 1}: bare {bares[-1]:.3f} steps/s, stillroom {ours_all[-1]:.3f} steps/s, "
                  f"ratio of medians so far {ratios[-1]:.3f}", flush=True)
            if len(bares) >= args.rounds and abs(ratios[-1] - ratios[-2]) <= 0.02 * ratios[-2]:
                break
        ours, bare = statistics.median(ours_all), statistics.median(bares)
        blocked = loader_seconds(config) / (args.steps / ours)
        far = far_resume_seconds(work)
        config.write_text(config.read_text().replace('name = "bench"', 'name = "signal"')
                          .replace(f"steps = {args.steps}", "steps = 100000"))
        records, exit_s = stillroom_run(config, free_port(), signal_at=5)
        save_s = [r for r in records if r["kind"] == "checkpoint"][-1]["seconds"]
    rows = [(f"bare DeepSpeed steps/s (median of {len(bares)})", f"{bare:.3f}", "", None),
            (f"stillroom steps/s (median of {len(ours_all)})", f"{ours:.3f}", "", None),
            ("stillroom / bare (ratio of medians)", f"{ours / bare:.3f}", ">= 0.95", ours / bare >= 0.95),
            ("ratio of medians, one round fewer", f"{ratios[-2]:.3f}" if len(ratios) > 1 else "-", "", None),
            ("loader blocked / step time", f"{100 * blocked:.2f}%", "<= 1%", blocked <= 0.01),
            ("loader resume at 10^8 tokens (s)", f"{far:.3f}", "<= 1", far <= 1),
            ("checkpoint write on signal (s)", f"{save_s:.2f}", "", None),
            ("SIGUSR2 -> checkpoint -> exit (s)", f"{exit_s:.2f}", "<= 5", (exit_s or 99) <= 5)]
    width = max(len(r[0]) for r in rows)
    print(f"model: tiny Llama hidden {args.hidden}, {args.layers} layers; 2 ranks x micro-batch 4 x accum 2 x 256 "
          f"tokens; {args.steps} steps\n\n{'figure':<{width}}  {'measured':>12}  {'goal':>8}  verdict")
    for figure, measured, goal, ok in rows:
        print(f"{figure:<{width}}  {measured:>12}  {goal:>8}  {'' if ok is None else 'pass' if ok else 'short'}")
    emit(rows)


if __name__ == "__main__":
    main()
