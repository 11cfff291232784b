#!/usr/bin/env bash
# The LLaMA-Factory reference for the template parity tests: llamafactory 0.9.5 from PyPI in a venv of its own,
# kept outside the clone and keyed by this file (the pins live here). Called by scripts/setup.sh; prints only the
# `export EXPORTER_LF_PYTHON=...` line. torch is the CPU build; torchaudio and torchvision are left out (torchvision
# 0.28 fails against torch 2.13 CPU) and an empty `torchaudio` module stands in for the one LF's multimodal plugin
# imports at module level. LF's web UI, API and media extras (gradio, fastapi, uvicorn, sse-starlette, modelscope,
# av, hf-transfer) are left out too: the parity tests import only `llamafactory.data` and `llamafactory.hparams`.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${EXPORTER_CACHE:-$HOME/.cache/exporter-ci}
PY=${PYTHON:-python3}
PINS=(
  "llamafactory==0.9.5"
  "transformers==5.6.0" "peft==0.18.1" "accelerate==1.11.0" "datasets==4.0.0" "trl==0.24.0" "tokenizers<0.23"
  "sentencepiece" "tiktoken" "protobuf" "omegaconf" "einops" "fire" "tyro<0.9.0" "torchdata==0.11.0"
  "numpy" "packaging" "pyyaml" "safetensors" "pandas"
)
key=$( (cat "$0"; "$PY" -c 'import sys;print(sys.version_info[:2])') | sha256sum | cut -c1-16)
venv="$CACHE/lf-venv-$key"
if [ ! -f "$venv/.complete" ]; then
  echo "[setup] creating the LLaMA-Factory reference venv $venv" >&2
  start=$(date +%s)
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/pip" install -q torch==2.13.0 >&2
  "$venv/bin/pip" install -q "${PINS[@]:1}" >&2
  # --no-deps for llamafactory itself: it requires torchaudio/torchvision (and the web UI); the rest is pinned above.
  "$venv/bin/pip" install -q --no-deps "${PINS[0]}" 2>&1 | grep -v "^llamafactory .* requires\|dependency resolver" >&2 || true
  site=$("$venv/bin/python" -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$site/torchaudio"
  echo '"""Empty stand-in: LLaMA-Factory imports torchaudio at module level; the text templates never use it."""' \
    >"$site/torchaudio/__init__.py"
  "$venv/bin/python" - <<'PY' >&2
import torch
assert torch.version.cuda is None, f"a CUDA build of torch was installed ({torch.version.cuda})"
from llamafactory.data.template import TEMPLATES
print(f"[setup] llamafactory reference: {len(TEMPLATES)} templates, torch {torch.__version__}")
PY
  touch "$venv/.complete"
  echo "[setup] LLaMA-Factory venv built in $(( $(date +%s) - start )) s" >&2
fi
echo "export EXPORTER_LF_PYTHON=\"$venv/bin/python\""
