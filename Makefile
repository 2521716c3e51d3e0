# make demo   -- set up .venv (first time) and tour the whole journey on the demo sample (launcher/tour.py): prep,
#                ZeRO-3 training (2 CPU ranks without a GPU), export-adapter, merge --verify, eval, plot
# make test   -- set up .venv (first time) and run the test suite (what CI runs, .ci/run)
# make test-fast -- the tests that start no ranks and need no cluster (seconds to minutes; no root needed)
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed before the project so that a bare `torch` requirement never pulls a CUDA build on a
# CPU machine. Elsewhere: make setup TORCH_SPEC=torch==2.13.0 PIP_TORCH_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=

.PHONY: setup demo lint test test-fast

# setup also installs what the cluster tests need (Slurm, OpenMPI, shellcheck, mpi4py; as root, Debian);
# tests/system_deps.sh returns at once when all of it is there. The demo needs only the venv.
setup: $(VENV)/.installed
	bash tests/system_deps.sh $(PY)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) launcher/tour.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup lint
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not distributed and not cluster"
