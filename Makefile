# `make demo` and `make test` each set everything up first (system packages, a
# virtualenv in .venv, hxc and its pinned toolchain), so both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench bench-deps clean

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

# benchmarks/llm.py's peers (pyproject's `bench` extra). llama-cpp-python builds from source
# (~10+ minutes on 2 cores), so its wheel is built once into $(WHEELS), beside the source
# package (whose llama.cpp/convert_hf_to_gguf.py the benchmark runs), and installed from there
# after. GGML_NATIVE: built for this machine's CPU, as a llama.cpp user builds it; a wheel
# from a machine with other CPU features must be rebuilt (delete it from $(WHEELS)).
WHEELS ?= $(or $(HXC_WHEELS),/work/.cache/wheels)  # benchmarks/llm.py reads HXC_WHEELS, the same default
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
# llama.cpp's C++ server for benchmarks/llm_serve.py --llama-cpp (it reads HXC_LLAMA_SERVER, else this default).
LLAMA_SERVER_BUILD ?= /work/.cache/llama-server-build
bench-deps: setup
	@mkdir -p $(WHEELS)
	@ls $(WHEELS)/llama_cpp_python-0.3.36.tar.gz >/dev/null 2>&1 || \
		$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: -d $(WHEELS) $(LLAMA_CPP_PYTHON)
	@ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || { \
		echo "bench-deps: building llama-cpp-python into $(WHEELS) (once; ~10+ minutes)…"; \
		CMAKE_ARGS="-DGGML_NATIVE=ON" $(BIN)/python -m pip wheel --quiet --no-deps -w $(WHEELS) \
			$(WHEELS)/llama_cpp_python-0.3.36.tar.gz; }
	$(BIN)/python -m pip install --quiet --find-links $(WHEELS) -e '.[bench]'
	@test -d $(WHEELS)/llama_cpp_python-0.3.36 || tar -xzf $(WHEELS)/llama_cpp_python-0.3.36.tar.gz -C $(WHEELS)
	@scripts/build-llama-server.sh $(WHEELS)/llama_cpp_python-0.3.36 $(LLAMA_SERVER_BUILD)

clean:
	rm -rf $(VENV) example.hxc .pytest_cache
