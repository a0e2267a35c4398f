# `make demo` and `make test` each set everything up first (system packages, a
# virtualenv in .venv, hxc and its pinned toolchain), so both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

# One line per step (the pip step takes minutes, and says nothing else unless it fails).
$(VENV)/.installed: pyproject.toml scripts/install-system-deps.sh
	@scripts/install-system-deps.sh
	@echo "setup: creating the virtualenv $(VENV)…"
	@$(PYTHON) -m venv $(VENV)
	@echo "setup: installing hxc and its pinned toolchain into $(VENV) (~1.5 GB, a few minutes)…"
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[all,test]'
	@touch $@
	@echo "setup: done; use $(BIN)/hxc (or activate $(VENV))"

demo: setup
	$(BIN)/hxc compile hxc.examples:convnet --targets all -o example.hxc
	$(BIN)/hxc inspect example.hxc
	$(BIN)/hxc verify example.hxc

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) example.hxc .pytest_cache
