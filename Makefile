# Entry points that work on a fresh machine: `make train`, `make test` and
# `make bench`. They create the virtual environment on first use:
# torch==2.13.0 (CPU wheel) first, then the project with its pinned dependencies.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
RUN_DIR ?= runs/default
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: train test bench bench-learning gpu-check venv clean dataset warm-checkpoint

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

# `make train` replaces the outputs of its previous run in $(RUN_DIR) (editrl train
# refuses a used run directory without --overwrite or --resume); TRAIN_ARGS= keeps them.
TRAIN_ARGS ?= --overwrite

train: venv
	$(VENV)/bin/editrl train --config $(CONFIG) --run-dir $(RUN_DIR) $(TRAIN_ARGS)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

# The benchmark suite (under 20 minutes on 2 cores): bench/results/<name>.json and
# docs/benchmarks.md; `BENCH_ARGS="--only learner_batching"` runs a subset.
bench: venv
	PYTHONPATH=$(CURDIR) $(PY) -m bench $(BENCH_ARGS)

# Edit-GRPO, DiffusionNFT and AWM on the embedded default, 2 repeats each (about 40 minutes
# on 2 cores): bench/results/algorithms.json and docs/algorithms_measured.md.
bench-learning: venv
	PYTHONPATH=$(CURDIR) $(PY) -m bench.algorithms $(BENCH_ARGS)

# On a machine with a CUDA device: the tests marked `gpu` (the learner's recomputed
# log-probs in bf16, the in-process VLM judge, the sharded learner on NCCL, the plan's
# learner estimate against the GPU's peak) and the benchmarks' GPU section (item 7).
# Without one, both report that they were skipped and why.
gpu-check: venv
	$(PY) -m pytest -m gpu -rs $(PYTEST_ARGS)
	PYTHONPATH=$(CURDIR) $(PY) -m bench --only gpu

# Rebuild the bundled clips and prompt tables (deterministic).
dataset: venv
	$(PY) scripts/build_dataset.py --out assets/clips

# Rebuild the supervised warm-up checkpoint that `make train` starts from: VAE and
# 3000 DiT steps from scratch, then 6000 more DiT steps from that checkpoint.
warm-checkpoint: venv
	$(PY) scripts/make_warm_checkpoint.py --data assets/clips --out assets/warm_checkpoint
	$(PY) scripts/make_warm_checkpoint.py --data assets/clips --init-from assets/warm_checkpoint --out assets/warm_checkpoint --dit-steps 6000 --seed 1 --threads 1

clean:
	rm -rf runs .pytest_cache
