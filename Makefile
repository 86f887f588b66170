# Two commands do all set-up on a fresh machine: `make pretrain` and `make test`.
# TORCH_SPEC pins torch before anything else is installed. On a CUDA machine pass the CUDA build of
# the same version, e.g.  make pretrain TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dsllm-installed
OPS_STAMP := $(VENV)/.dsllm-ops-built

# DeepSpeed compiles its C++ ops on first use (ninja + g++). Each virtualenv keeps its own builds: in the shared
# ~/.cache/torch_extensions another virtualenv's torch or DeepSpeed rebuilds them, minutes of silence each time.
# dsllm's commands use the same folder when TORCH_EXTENSIONS_DIR is unset (dsllm/ops.py). The venv's bin/ goes
# first on PATH for every recipe: ninja (which DeepSpeed runs even for a built op) and deepspeed are there.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install pretrain test test-fast test-e2e lint format bad-inputs-table clean-venv

install: $(OPS_STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

# The DeepSpeed ops that runs of ds_configs/*.json load (CPU: deepspeed_shm_comm, fused_adam, cpu_adam, about
# 2 minutes on 2 idle cores), built now rather than in the first run; it says what it builds, where and for how
# long, and skips what is built already.
$(OPS_STAMP): $(STAMP) $(wildcard ds_configs/*.json) dsllm/ops.py
	$(PY) -m dsllm.ops build ds_configs/*.json
	touch $(OPS_STAMP)

# glibc malloc that keeps freed memory instead of handing it back to the kernel every step: +15-18% tokens/s
# on CPU (benchmarks/results/2026-11-21-throughput-intel-xeon-2c-malloc.md); an existing GLIBC_TUNABLES wins.
MALLOC_TUNING ?= glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296

# The main job: pretrain on the embedded default corpus (or pass PRETRAIN_ARGS="--data DIR ...").
pretrain: $(OPS_STAMP)
	GLIBC_TUNABLES="$${GLIBC_TUNABLES:-$(MALLOC_TUNING)}" \
		$(VENV)/bin/deepspeed launch/pretrain.py --recipe launch/recipes/default.yaml $(PRETRAIN_ARGS)

# Every test: tests/unit, tests/e2e and tests/multinode (about half an hour on 2 CPU cores)
test: $(OPS_STAMP)
	$(PY) -m pytest -q --durations=40 tests

# The unit tier: functions and commands that answer in seconds, no launcher, no training run (about 2 minutes
# on 2 CPU cores)
test-fast: $(OPS_STAMP)
	$(PY) -m pytest -q tests/unit

# Training runs on 1 and 2 ranks (faults, resumes, fine-tuning, evaluation) and the simulated nodes
test-e2e: $(OPS_STAMP)
	$(PY) -m pytest -q tests/e2e tests/multinode

# Style is the tools' job (pyproject.toml): ruff's lint rules and its formatter, line length 120
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# README.md's table of bad inputs, from the cases in tests/unit/test_bad_inputs.py (about ten seconds)
bad-inputs-table: $(STAMP)
	$(PY) tests/bad_inputs_table.py

clean-venv:
	rm -rf $(VENV)
