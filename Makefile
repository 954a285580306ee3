# The README's commands. `make run` and `make test` install everything they need into .venv first.
# The interpreter for the venv; empty: scripts/install.sh takes the first of python3.11, python3.12, python3
# that is 3.11 or 3.12.
PY ?=
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export RAY_AUTH_MODE ?= disabled

.PHONY: install run generate test test-fast bench bench-scale bench-fixes bench-preempt bench-loss calibrate-sim models lint clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	PY=$(PY) bash scripts/install.sh $(VENV)
	touch $(STAMP)

# Materialize the embedded teacher and student into the cache and print their paths and sizes.
models: $(STAMP)
	$(BIN)/python -m gen_ssd_ray.common.embedded_models

# The whole experiment on the embedded lab task: teacher, cold start, generation per method,
# distillation, evaluation, report (conf/pipeline.yaml).
run: $(STAMP)
	$(BIN)/python -m jobs.pipeline --config conf/pipeline.yaml $(ARGS)

# The generation job alone on the SmolLM2 + GSM8K default (conf/default.yaml).
generate: $(STAMP)
	$(BIN)/python -m jobs.generate --config conf/default.yaml $(ARGS)

# Every tier but the GPU one. This -m replaces the one in pyproject.toml's addopts (the fast unit tier,
# what a bare `pytest` runs), which is what `make test-fast` runs.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not gpu" $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration and not slow and not gpu" $(ARGS)

# Generation (ARGS: overrides of conf/default.yaml), then fine-tuning and the methods' costs (FT_ARGS).
bench: $(STAMP)
	$(BIN)/python -m scripts.bench $(ARGS)
	$(BIN)/python -m scripts.bench_finetune $(FT_ARGS)

# Scale and fault figures on the simulated GPU cluster (gen_ssd_ray.sim): one JSON object, last line.
# ARGS="--profile short" is the test suite's few-minute version.
bench-scale: $(STAMP)
	$(BIN)/python -m scripts.bench_scale $(ARGS)

# Each fix of the simulated-cluster work against a run with it switched off: one JSON object, last line.
bench-fixes: $(STAMP)
	$(BIN)/python -m scripts.bench_fixes $(ARGS)

# What a preemption costs with the trajectory journal: the simulated cluster with 16k-token
# trajectories killed at 80% (with and without the journal), then SIGKILL/resume cycles of the CPU
# default (ARGS: --part sim|cpu, --cycles N, --limit N). One JSON object, last line.
bench-preempt: $(STAMP)
	$(BIN)/python -m scripts.bench_preempt $(ARGS)

# Peak memory of one forward+backward of a large-vocabulary tiny model with the full-logits loss and the
# sliced one (loss.slice_tokens), each in a fresh process (ARGS: --vocab, --tokens, ...). JSON last line.
bench-loss: $(STAMP)
	$(BIN)/python -m scripts.bench_loss_memory $(ARGS)

# Measure the real vLLM engine and hf scorer on this machine into conf/sim/cpu.yaml (a few minutes).
calibrate-sim: $(STAMP)
	$(BIN)/python -m gen_ssd_ray.sim.calibrate $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf outputs .pytest_cache
