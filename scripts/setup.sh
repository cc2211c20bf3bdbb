#!/usr/bin/env bash
# Create .venv and install arx with everything its tests and demo need, on a fresh machine.
# torch==2.13.0 goes first: it is the CPU wheel that lies on our machines, and once it is in,
# the pinned extras find their torch requirement satisfied instead of pulling CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "arx installed in .venv ($(.venv/bin/arx --version))"
