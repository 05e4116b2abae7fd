#!/usr/bin/env bash
# One-step, idempotent set-up: a virtual environment at .venv with torch + torchvision installed first
# (the registry's default wheels: CUDA builds that also run on CPU), then this package and its pinned
# dependencies.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.itmatch-setup
want=$(cat pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -c "import torch; import torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
echo "$want" > "$stamp"
