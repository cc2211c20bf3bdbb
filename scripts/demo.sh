#!/usr/bin/env bash
# Set up (scripts/setup.sh), export the embedded default model and generate text with it on
# ONNX Runtime (CPU). No download: the model is in models/arx-tiny.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/arx export models/arx-tiny -o out/arx-tiny.arx --overwrite
.venv/bin/arx inspect out/arx-tiny.arx
.venv/bin/arx generate out/arx-tiny.arx --prompt "${PROMPT:-Once upon a time}" --max-new-tokens 80
