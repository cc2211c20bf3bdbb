#!/usr/bin/env bash
# Create .venv and install arx with everything its tests and demo need, on a fresh machine.
# --gpu: also the gpu extra, and onnxruntime's GPU build *instead of* its CPU build (both wheels
# install the same onnxruntime module, so pip's extras cannot do it: README, Install).
# torch==2.13.0 goes first: it is the CPU wheel that lies on our machines, and once it is in,
# the pinned extras find their torch requirement satisfied instead of pulling CUDA builds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=dev
for arg in "$@"; do
  case "$arg" in
    --gpu) EXTRAS=dev,gpu ;;
    *) echo "usage: scripts/setup.sh [--gpu]" >&2; exit 2 ;;
  esac
done
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
if [ "$EXTRAS" = dev,gpu ]; then
  # Uninstall both first: removing one wheel after the other was installed deletes shared files.
  ORT=$(.venv/bin/python -c "from arx.environment import pinned_ort_version as v; print(v())")
  .venv/bin/python -m pip uninstall -q -y onnxruntime onnxruntime-gpu
  .venv/bin/python -m pip install -q "onnxruntime-gpu==$ORT"
  .venv/bin/arx inspect --env | sed -n 2,3p
fi
echo "arx installed in .venv ($(.venv/bin/arx --version))"
