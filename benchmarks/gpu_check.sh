#!/usr/bin/env bash
# A GPU proof that fits the GPU host available (README, "GPU check"); the work is in gpu_check.py.
#   benchmarks/gpu_check.sh local     here, with the network and hxc[compile]: wheels + bundles into .gpu_check/
#   benchmarks/gpu_check.sh remote    on the GPU host, one command (under 5 minutes): $OUT/gpu_check.json and .log
#   benchmarks/gpu_check.sh dry-run   both halves here, Vulkan (lavapipe) standing in for the GPU
# Each takes options after it: benchmarks/gpu_check.sh remote -h
set -u
cd "$(dirname "$0")/.." || exit 1
case "${1:-}" in
  remote)
    # The GPU host's own Python, the one with torch; hxc comes from the carried wheels.
    py=${PYTHON:-python3}
    if ! command -v "$py" >/dev/null 2>&1; then
      out=${OUT:-.gpu_check/out}
      mkdir -p "$out"
      printf '{"schema": "hxc-gpu-check/1", "ok": false, "status": "failed", "error": "no %s on this host"}\n' "$py" >"$out/gpu_check.json"
      echo "error: no $py on this host" | tee "$out/gpu_check.log" >&2
      exit 1
    fi
    exec "$py" benchmarks/gpu_check.py "$@" ;;
  local | dry-run)
    # A Python with hxc[compile]: $PYTHON, else make's .venv, else python3.
    if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
    exec "$py" benchmarks/gpu_check.py "$@" ;;
  *)
    echo "usage: benchmarks/gpu_check.sh local|remote|dry-run [options]   (-h after one lists its options)" >&2
    exit 2 ;;
esac
