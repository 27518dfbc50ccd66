# `make demo` and `make test` set everything up on a fresh machine: they create .venv when it
# is missing and (re)install the package when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo train-demo serve-demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[savedmodel]"
	$(BIN)/python -m zoo.kernels.build
	touch $@

EXAMPLES := examples/zoo-pallas-mlstm examples/zoo-mlstm-sig

$(VENV)/.installed-test: pyproject.toml $(addsuffix /pyproject.toml,$(EXAMPLES)) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]" $(addprefix -e ,$(EXAMPLES))
	$(BIN)/python -m zoo.kernels.build
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/zoo validate configs/demo.json
	rm -rf checkpoints/demo
	$(BIN)/zoo build configs/demo.json --out checkpoints/demo --tokenizer configs/demo-tokenizer.json
	@echo "# the model's weights are random, so its text is gibberish: the demo shows the path, not a language model"
	$(BIN)/zoo generate checkpoints/demo --prompt "The quick brown fox" --max-new-tokens 24 --temperature 0.8 --top-p 0.95
	$(BIN)/zoo generate checkpoints/demo --prompt-ids 1,2,3,4 --prompt-ids 5,6 --max-new-tokens 12
	rm -rf artifacts/demo-stablehlo artifacts/demo-savedmodel
	$(BIN)/zoo export checkpoints/demo --format stablehlo --out artifacts/demo-stablehlo
	$(BIN)/zoo export checkpoints/demo --format savedmodel --out artifacts/demo-savedmodel
	$(BIN)/zoo run artifacts/demo-stablehlo --prompt "The quick brown fox" --max-new-tokens 12
	$(BIN)/zoo run artifacts/demo-savedmodel --prompt "The quick brown fox" --max-new-tokens 12

# `zoo train` on real text every machine has: ~1.2 MB of the Python standard library's own source (96 files of 5
# packages). A tiny model with a 2048-token byte-level BPE trained on it, for at most 4 minutes; the held-out loss
# (5% of the files) falls from ln 2048 = 7.6 nats/token (README.md, "Training"); then a greedy continuation.
STDLIB = $(shell $(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")
DEMO_TEXT := asyncio email json importlib concurrent

train-demo: $(VENV)/.installed
	rm -rf checkpoints/train-demo
	$(BIN)/zoo train tiny --vocab-size 2048 $(addprefix --data $(STDLIB)/,$(DEMO_TEXT)) --out checkpoints/train-demo \
		--steps 500 --batch-size 16 --seq-len 128 --lr 3e-3 --warmup-steps 30 --eval-every 50 --save-every 250 \
		--max-time 240
	$(BIN)/zoo generate checkpoints/train-demo --prompt "def " --max-new-tokens 40

# the demo checkpoint (make demo) behind the OpenAI-compatible server on http://127.0.0.1:8000 (Ctrl-C stops it)
serve-demo: $(VENV)/.installed
	test -d checkpoints/demo || $(MAKE) demo
	$(BIN)/zoo serve checkpoints/demo --model-name demo

# -n auto: one pytest worker per core (2 on the CI machine); loadgroup: tests marked with one xdist_group (those
# sharing a server process) run on one worker
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n auto --dist loadgroup

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python -m zoo.kernels.build
	touch $@ $(VENV)/.installed

# kernel, model, decode, generation, compile, export and training benchmarks (~30-35 min on 2 cores); writes
# benchmarks/results/bench.json and PNG plots, prints the targets met/missed. `make bench BENCH_ARGS=--quick`: smoke run
bench: $(VENV)/.installed-bench
	$(BIN)/python -m benchmarks all $(BENCH_ARGS)

clean:
	rm -rf $(VENV) checkpoints artifacts .pytest_cache
