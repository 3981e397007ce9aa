#!/usr/bin/env bash
# The GPU check, ready for whenever a machine with an NVIDIA GPU is lent:
#   (a) our LoRA trainer vs the Trainer + PEFT baseline in bf16: tokens/s, peak GPU memory and
#       MFU against the GPU's measured bf16 matmul peak (bench/trainer/run.py --quick);
#   (b) vLLM on the GPU with runtime LoRA behind the gateway: latency, throughput, gateway CPU,
#       and the hot-swap under load, failed requests counted (bench/gateway/run.py --quick);
#   (c) everything in bench/gpu/results.json. Under 8 minutes.
#
#   bench/gpu_check.sh [--cpu-only] [--model DIR]
#   bench/gpu_check.sh --download-wheels     # here, before going to a machine with no network
#
# --cpu-only runs the same plumbing with the GPU parts skipped (make test runs it). Installs what
# it needs: the project's pure-Python dependencies the machine lacks, from bench/gpu/wheels
# (offline) or the package index. vLLM's GPU build (~400 MB) cannot be carried; where it is not
# installed, part (b) is recorded as skipped with that reason.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/gpu/wheels
# Dependencies the trainer and gateway import that a stock CUDA + PyTorch image lacks.
NEEDED="pydantic pydantic-settings structlog sqlmodel sqlalchemy alembic fastapi starlette uvicorn orjson datasets dill multiprocess xxhash datasketch slack-sdk psycopg psycopg-binary gguf"

if [ "${1:-}" = "--download-wheels" ]; then
  mkdir -p "$WHEELS"
  python3 -m pip download -q --only-binary :all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$WHEELS" $NEEDED
  du -sh "$WHEELS"
  exit 0
fi

PY=${FLYWHEEL_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import torch, transformers, peft, pydantic_settings, structlog, sqlmodel, fastapi, orjson, datasets" 2>/dev/null; then
  echo "installing missing dependencies into $("$PY" -c 'import sys; print(sys.prefix)')"
  if [ -d "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" $NEEDED
  else
    "$PY" -m pip install -q $NEEDED
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec timeout 470 "$PY" bench/gpu/check.py "$@"
