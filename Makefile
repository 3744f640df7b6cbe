# kdedge: two commands from a fresh clone — `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The development environment pins torch (the library itself only needs torch>=2.4). On Linux,
# PyPI's torch wheel bundles CUDA: a multi-GB download. TORCH_INDEX takes torch from another index,
# e.g. PyTorch's CPU-only wheels (torch==2.13.0 resolves to 2.13.0+cpu there):
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo
# torch comes from that index alone (with the dependencies it hosts, as pytorch.org's own install
# command does), never mixed with PyPI's CUDA wheel; kdedge and everything else then come from PyPI.
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
# The edge runtimes (ExecuTorch, LiteRT, OpenVINO; ~1.5 GB with their dependencies), so `make test` runs every
# format for real (KDEDGE_REQUIRE_EDGE=1: a missing runtime fails its tests). `make EXTRAS= test` leaves them out
# and their tests skip, naming the extra.
EXTRAS ?= edge
comma := ,
space := $(subst ,, )
# One stamp per extras set: `make EXTRAS= install` then `make test` installs the edge runtimes.
STAMP  := $(VENV)/.kdedge-installed$(if $(strip $(EXTRAS)),-$(subst $(space),-,$(strip $(EXTRAS))))

# What the demo needs, and nothing more: torch and kdedge with its core dependencies (ONNX, onnxruntime).
DEMO_STAMP := $(VENV)/.kdedge-installed-core
# What the documentation site needs: kdedge (the CLI reference imports its click commands) and MkDocs.
DOCS_STAMP := $(VENV)/.kdedge-installed-docs

.PHONY: install install-core data data-core browser docs demo test test-durations test-fast bench bench-deploy teacher clean

install: $(STAMP)
install-core: $(DEMO_STAMP)

# Python writes each module's bytecode on its first import and reads it after (see --no-compile below). An environment with
# PYTHONDONTWRITEBYTECODE=1 (this project's machines have it) makes every process compile torch, onnx and ExecuTorch from
# source again: 7 s of a 26 s `kdedge bench` here, and the suite starts over a hundred such processes. Measured on the
# tutorials' tests (35 processes): 264 s with it, 202 s without.
unexport PYTHONDONTWRITEBYTECODE

# $(1): the extras to install with kdedge ("" for none).
# --no-compile: Python compiles a module's bytecode when it is first imported, so only what runs is compiled, instead of every
# file of ~1.5 GB of packages up front (as uv installs by default). Measured from warm wheels on the 2-core machine: torch plus
# kdedge[dev,edge] 151 s with pip's default, 63 s without.
define pip_install
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-compile $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH)"
	$(if $(TORCH_INDEX),@$(PY) -c "import torch; print('torch', torch.__version__, 'from $(TORCH_INDEX); CUDA:', torch.version.cuda)")
	$(PY) -m pip install --quiet --no-compile -e '.$(if $(strip $(1)),[$(subst $(space),$(comma),$(strip $(1)))])'
endef

$(STAMP): pyproject.toml
	$(call pip_install,dev $(EXTRAS))
	@touch $(STAMP)

$(DEMO_STAMP): pyproject.toml
	$(call pip_install,)
	@touch $(DEMO_STAMP)

$(DOCS_STAMP): pyproject.toml
	$(call pip_install,docs)
	@touch $(DOCS_STAMP)

# Fashion-MNIST: found locally ($$KDEDGE_DATA, ~/.cache/kdedge, /usr/share/datasets), else Debian's
# package when we may install it, else the official files (sha256-checked) via `kdedge data`.
define fetch_data
	@KDEDGE_OFFLINE=1 $(VENV)/bin/kdedge data fashion-mnist >/dev/null 2>&1 \
	  || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	       && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null; } \
	  || true
	@$(VENV)/bin/kdedge data fashion-mnist
endef

data: $(STAMP)
	$(fetch_data)

data-core: $(DEMO_STAMP)
	$(fetch_data)

# Headless Chromium for tests/test_docs_site.py: Debian's package, installed when make runs as root with apt (as the data
# is; about 30 s); elsewhere install it yourself, or the browser test skips.
browser:
	@chromium --version >/dev/null 2>&1 || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; } || true

# The documentation site, docs/ + mkdocs.yml -> site/. --strict: a broken link, a page left out of the nav or an API
# reference that names nothing fails the build (tests/test_docs_site.py builds it the same way, then opens it in Chromium).
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# The embedded default: shipped teacher -> tiny_cnn -> ONNX FP32/INT8 -> CPU benchmark -> gates -> runs/bundle-<time>.
# It runs no edge runtime and no test, so it installs neither (`make test` adds them to the same venv).
demo: data-core
	$(VENV)/bin/kdedge compress-and-export

# Test processes (pytest-xdist). Each test file runs whole in one of them (--dist loadscope), so a module's shared fixture
# (a trained bundle, say) is built once. 2 on the 2-core development machine: much of the suite is single-threaded
# (exports, runtimes' converters, process start-up), and two workers overlap it.
TEST_WORKERS ?= 2
# --durations=15: every run ends with its 15 slowest tests, so a test that grows is seen by whoever made it grow.
# --no-loadscope-reorder: files go to the workers longest first, as tests/conftest.py orders them (tests/durations.json).
PYTEST := $(PY) -m pytest -q $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder) --durations=15

# KDEDGE_REQUIRE_BROWSER=1 where Chromium is installed: the site's browser test then fails rather than skips.
test: data browser
	$(if $(filter edge,$(EXTRAS)),KDEDGE_REQUIRE_EDGE=1) KDEDGE_REQUIRE_BROWSER=$$(chromium --version >/dev/null 2>&1 && echo 1 || echo 0) $(PYTEST)

# Re-record tests/durations.json (seconds per test file) from a whole run: commit it when files grew or shrank.
test-durations: data
	$(if $(filter edge,$(EXTRAS)),KDEDGE_REQUIRE_EDGE=1) KDEDGE_RECORD_DURATIONS=1 $(PYTEST)

# The inner loop: the suite without the end-to-end runs marked slow (whole bundles, searches, DDP, the docs notebook, the tutorials).
test-fast: data
	$(if $(filter edge,$(EXTRAS)),KDEDGE_REQUIRE_EDGE=1) $(PYTEST) -m "not slow"

bench: data
	$(PY) benchmarks/kd_vs_scratch.py

bench-deploy: data
	$(PY) benchmarks/export_check.py
	$(PY) benchmarks/teacher_vs_student.py
	$(PY) benchmarks/harness_overhead.py

teacher: data
	$(PY) scripts/train_teacher.py --epochs 30 --random-erasing 0 --precision fp32 --run-dir runs/teacher-v1 \
		--out kdedge/models/weights/resnet-fashion-mnist.safetensors  # the shipped teacher (v1)

clean:
	rm -rf runs .pytest_cache build site *.egg-info
