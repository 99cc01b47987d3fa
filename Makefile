# Two commands from a fresh clone:  make demo   (the main job)   and   make test   (the tests).
# Each bootstraps what it needs: a git-ignored .venv (torch first, then the package, scipion-app,
# scipion-em-relion) and a git-ignored Scipion home in .scipion configured unattended.
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
# torch goes in first so the package's "torch>=2.1" is already met (no multi-GB CUDA download on CPU boxes);
# override e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" for GPUs.
TORCH_SPEC ?= torch==2.13.0
SCIPION_PINS := numpy==1.26.1 scipy==1.10.0 matplotlib==3.8.1 "mrcfile<=1.4.3"
STAMP := $(VENV)/.gmmhet-installed

export SCIPION_HOME := $(CURDIR)/.scipion
export SCIPION_USER_DATA := $(SCIPION_HOME)/data
export SCIPION_TESTS_OUTPUT := $(SCIPION_HOME)/data/Tests
export PATH := $(VENV)/bin:$(PATH)
export MPLBACKEND := Agg
export PYTHONUNBUFFERED := 1
# Tests, the demo and Scipion's protocol subprocesses import this checkout's code (also from a
# git worktree that shares the .venv of another checkout).
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

# Scipion-harness test modules shipped inside the package (python -m scipion tests ...).
HARNESS_TESTS := scipion_gmmhet.tests

.PHONY: demo gui test test-engine test-scipion test-numpy2 bootstrap bench clean

bootstrap: $(STAMP)

# System packages for the GUI-form screenshot test (Xvfb); installed when missing and we are root
# with apt, otherwise that one test is skipped with a message.
XVFB_PACKAGES := xvfb xfonts-base fonts-dejavu-core

$(STAMP): setup.py
	@command -v Xvfb >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get install -y -qq $(XVFB_PACKAGES) >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $(XVFB_PACKAGES) >/dev/null 2>&1)) || \
	  echo "note: Xvfb not installed; the GUI screenshot test will be skipped"; }
	@test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 11) else \
	  "make: $(PYTHON) is Python %d.%d; the pinned Scipion stack (scipy 1.10.0, torch 2.13.0) needs 3.10 or 3.11: " \
	  "run e.g. make demo PYTHON=python3.11" % sys.version_info[:2])'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q $(SCIPION_PINS) scipion-pyworkflow scipion-em scipion-app scipion-em-relion pytest hypothesis
	$(PY) -m pip install -q --no-build-isolation -e . || $(PY) -m pip install -q -e .
	$(PY) -c "import tkinter, torch, pwem, pyworkflow, relion, scipion_gmmhet.engine.cli"
	@test -f $(SCIPION_HOME)/config/scipion.conf || $(PY) -m scipion config --unattended
	@touch $(STAMP)

test: test-engine test-scipion

test-engine: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

# The engine on numpy 2 (as on GPU machines; Scipion itself pins numpy 1.26): a second git-ignored
# venv without Scipion, the engine tests that need no Scipion (those that do are skipped). Not in CI.
NP2_VENV := $(CURDIR)/.venv-numpy2
test-numpy2:
	@test -x $(NP2_VENV)/bin/python || $(PYTHON) -m venv $(NP2_VENV)
	$(NP2_VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(NP2_VENV)/bin/python -m pip install -q "numpy>=2" scipy "mrcfile<=1.4.3" pandas matplotlib scikit-learn umap-learn pytest hypothesis
	$(NP2_VENV)/bin/python -m pytest -q -p no:cacheprovider tests

test-scipion: $(STAMP)
	$(PY) -m scipion tests $(HARNESS_TESTS)

demo: $(STAMP)
	$(PY) -m scipion_gmmhet.demo --out $(CURDIR)/demo-output

# Open a Scipion project in the GUI (default: the demo's): `make gui PROJECT=name`. With -O Scipion
# opens the window in this process (without it, it relaunches itself detached with the first python3
# on PATH and make returns at once); the command blocks until the window is closed.
PROJECT ?= gmmhet_demo
gui: $(STAMP)
	$(PY) -O -m scipion project $(PROJECT)

bench: $(STAMP)
	$(PY) benchmarks/bench_projection.py
	$(PY) benchmarks/bench_latent_quality.py

clean:
	rm -rf demo-output $(SCIPION_HOME)/data/Tests
