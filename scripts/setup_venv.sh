#!/usr/bin/env bash
# Creates .venv with the pinned stack (see docs/architecture.md, "Installing the stack").
# torchrec 1.8.0 declares a dependency on the CUDA build of fbgemm-gpu; on CPU machines we
# install fbgemm-gpu-cpu instead and torchrec with --no-deps plus its real requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] CUDA found: torch 2.13.0 + fbgemm-gpu 1.8.0 (CUDA build)"
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" fbgemm-gpu==1.8.0
else
  echo "[setup] no CUDA: torch 2.13.0 (CPU) + fbgemm-gpu-cpu 1.8.0"
  "${PIP[@]}" torch==2.13.0
  "${PIP[@]}" fbgemm-gpu-cpu==1.8.0
fi
"${PIP[@]}" --no-deps torchrec==1.8.0
"${PIP[@]}" -e '.[dev]'
"$VENV/bin/python" - <<'PY'
import torch, fbgemm_gpu, torchrec, lightning  # noqa: F401  (fails loudly if the stack does not load)
print(f"[setup] torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec, '__version__') else '1.8.0'}, lightning {lightning.__version__}")
PY
touch "$VENV/.installed"
