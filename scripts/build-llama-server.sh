#!/bin/sh
# llama.cpp's own OpenAI-compatible server (`llama-server`, continuous batching over
# `-np` slots): benchmarks/llm_serve.py --llama-cpp's peer. llama-cpp-python's Python
# server has no parallel slots (it answers one request at a time), so the C++ server is
# built from the llama.cpp source vendored in llama-cpp-python's source package, once.
# Usage: scripts/build-llama-server.sh SDIST_DIR BUILD_DIR   (GGML_NATIVE: this CPU)
set -eu
src="$1/vendor/llama.cpp"
build="$2"
[ -x "$build/bin/llama-server" ] && exit 0
[ -f "$src/CMakeLists.txt" ] || { echo "build-llama-server: no llama.cpp source at $src" >&2; exit 1; }
echo "bench-deps: building llama.cpp's llama-server into $build (once; ~10 minutes)…"
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
cmake --build "$build" --target llama-server -j "$(nproc)" >/dev/null
