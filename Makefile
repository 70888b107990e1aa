# `make demo` and `make test` both (re)create the local virtualenv, install the package with its native module,
# then run. Idempotent: the install step reruns only when the build inputs change.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU setup pin (installs from local disk here). A torch already in the venv (e.g. a CUDA build) is kept.
TORCH_SPEC ?= torch==2.13.0
# Older Triton releases the kernels must also compile under (tests/test_triton_compile.py): 3.6 is what torch 2.11's
# CUDA builds ship (the lent H100s run it); it rejected kernel code that the installed release accepts. Each goes
# into its own folder of the venv (not importable by default).
TRITON_COMPAT ?= 3.6.0
STAMP := $(VENV)/.animatelcm-installed
BUILD_INPUTS := pyproject.toml setup.py CMakeLists.txt $(shell find csrc -type f 2>/dev/null)
DEMO_OUT ?= outputs/demo.gif
TEST_WORKERS ?= 2
INDUCTOR_AUTOTUNE := benchmarks/results/inductor_autotune_h100.tar.gz

.PHONY: setup demo test test-slow bench bench-e2e gpu-carry mini-world wheel clean

setup: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q "setuptools>=77" wheel "pybind11>=2.12" "cmake>=3.18" ninja "pytest>=8" "pytest-benchmark>=4" "pytest-xdist>=3" triton tensorboard
	for v in $(TRITON_COMPAT); do test -d $(VENV)/triton-$$v || $(PY) -m pip install -q --no-deps --target $(VENV)/triton-$$v triton==$$v; done
	$(PY) -m pip install -q --no-build-isolation -e .
	@touch $@

demo: setup
	$(VENV)/bin/animatelcm generate --prompt "a red circle moving right" --upscale 8 --out $(DEMO_OUT)
	@echo "demo clip: $(abspath $(DEMO_OUT))"

# Two pytest workers, one thread each (tests/conftest.py): most tests are tiny models, bound by Python, so two
# workers finish in about 55 % of one's time on CI's two cores. TEST_WORKERS=0 runs the suite in one process.
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test-slow: setup
	$(PY) -m pytest -q -m slow

# Kernel benchmarks (appends to benchmarks/results/kernels.csv, rewrites kernels.md); glibc's allocator pinned so
# fresh large allocations do not make timings bimodal.
bench: setup
	MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 $(PY) -m pytest -q \
		benchmarks/test_kernels.py --benchmark-disable-gc --benchmark-columns=median,iqr,rounds

# End-to-end pipeline benchmark (diffusers eager vs patch_pipeline vs torch.compile; slow on a CPU).
bench-e2e: setup
	MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 $(PY) benchmarks/end_to_end.py

# What benchmarks/gpu_check.sh needs carried to a GPU machine without network or diffusers: diffusers' Python
# sources (about 30 MB) into .gpu_carry/site, and the max-autotune compile's results from earlier leases (committed
# from the compile step's inductor_autotune.tar.gz) into .inductor_cache. See README "GPU checks".
gpu-carry: setup
	rm -rf .gpu_carry && mkdir -p .gpu_carry/site
	cd $$($(PY) -c "import diffusers, os; print(os.path.dirname(os.path.dirname(diffusers.__file__)))") && \
		find diffusers -name '*.py' -exec cp --parents {} $(CURDIR)/.gpu_carry/site/ \;
	@if [ -f $(INDUCTOR_AUTOTUNE) ]; then mkdir -p .inductor_cache && tar -xzf $(INDUCTOR_AUTOTUNE) -C .inductor_cache && \
		echo "unpacked $(INDUCTOR_AUTOTUNE) into .inductor_cache (carry it to the compile step)"; fi
	du -sh .gpu_carry

# The miniature reproduction (issue 6): train every stage, evaluate the table, ship the default model. About 2.5 h
# on a 2-core CPU; resumable (rerun to continue). See README "Miniature reproduction".
mini-world: setup
	$(PY) -m pip install -q "matplotlib>=3.7"
	$(PY) benchmarks/mini_world.py all

wheel: setup
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist *.egg-info animatelcm/_C*.so $(VENV)
