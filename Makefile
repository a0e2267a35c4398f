# `make demo` and `make test` each set everything up first (system packages, a
# virtualenv in .venv, hxc and its pinned toolchain), so both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install-system-deps.sh
	scripts/install-system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[all,test]'
	touch $@

demo: setup
	$(BIN)/hxc compile hxc.examples:convnet --targets all -o example.hxc
	$(BIN)/hxc inspect example.hxc
	$(BIN)/hxc verify example.hxc

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) example.hxc .pytest_cache
