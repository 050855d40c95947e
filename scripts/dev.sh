#!/usr/bin/env bash
# One entry point for a fresh clone: each verb sets up what is missing, then runs.
#
#   scripts/dev.sh setup        create the virtual environment and install the package (+ test extra)
#   scripts/dev.sh quickstart   ... then run examples/quickstart.py           (make quickstart)
#   scripts/dev.sh bench [ARGS] ... then flix-kernels bench --quick ARGS       (make bench)
#   scripts/dev.sh demo [ARGS]  ... then flix-kernels demo --quick ARGS        (make demo)
#   scripts/dev.sh test [ARGS]  ... then python -m pytest -q tests ARGS        (make test)
#
# The environment is $FLIX_VENV (default .venv). torch: an installed one is kept; otherwise
# the CUDA build where an NVIDIA driver is present, else the CPU build (torch==
# $FLIX_TORCH_CPU_VERSION+cpu where pip finds such a wheel, e.g. in its find-links, else the
# newest from PyTorch's CPU index), so a CPU machine never downloads the CUDA wheels. The package is reinstalled when
# pyproject.toml or setup.py changed since the last install. FLIX_CUDA is passed through
# (see setup.py: unset builds the CUDA extension only where nvcc and a GPU driver are present).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${FLIX_VENV:-.venv}"
PY="$VENV/bin/python"
TORCH_CPU_VERSION="${FLIX_TORCH_CPU_VERSION:-2.13.0}"

say() { echo "[flix-kernels] $*" >&2; }

gpu_driver_present() {
  [ -e /proc/driver/nvidia/version ] || { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
}

setup() {
  if [ ! -x "$PY" ]; then
    local base="${PYTHON:-python3}"
    if ! "$base" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      say "Python 3.10 or newer is needed; '$base' is $("$base" --version 2>&1 || echo missing). Set PYTHON=/path/to/python3.x"
      exit 2
    fi
    say "creating the virtual environment $VENV ($("$base" --version 2>&1))"
    "$base" -m venv "$VENV"
  fi
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    if gpu_driver_present; then
      say "installing torch (an NVIDIA driver is present: the default CUDA build)"
      "$PY" -m pip install -q torch
    else
      say "installing the CPU build of torch (no NVIDIA driver here)"
      # A "+cpu" local version exists only as a local wheel or on PyTorch's CPU index (PyPI has none,
      # so the first try fails fast where no such wheel is on disk).
      "$PY" -m pip install -q "torch==${TORCH_CPU_VERSION}+cpu" 2>/dev/null \
        || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
  local stamp="$VENV/.flix-kernels-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
     || ! "$PY" -c "import flix_kernels" >/dev/null 2>&1; then
    say "installing flix_kernels (editable) with its test extra"
    "$PY" -m pip install -q -e ".[test]"
    touch "$stamp"
  fi
}

verb="${1:-}"
[ $# -gt 0 ] && shift
case "$verb" in
  setup) setup ;;
  quickstart) setup; exec "$PY" examples/quickstart.py "$@" ;;
  bench) setup; exec "$PY" -m flix_kernels bench --quick "$@" ;;
  demo) setup; exec "$PY" -m flix_kernels demo --quick "$@" ;;
  test) setup; exec "$PY" -m pytest -q tests "$@" ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
