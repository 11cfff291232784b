#!/usr/bin/env bash
# Install exporter into a virtualenv kept outside the clone, keyed by a hash of the dependency files, and make
# the test references (llama-cpp-python sdist: llama.cpp's converter, vocabularies, templates) available.
# A second run reuses everything; a bare machine builds the llama-cpp-python wheel once (~11 min on 2 cores).
# Prints nothing on stdout but `export` lines, so callers can `eval "$(bash scripts/setup.sh)"`.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { echo "[setup] $*" >&2; }

CACHE=${EXPORTER_CACHE:-$HOME/.cache/exporter-ci}
LLAMA_VERSION=0.3.36
PY=${PYTHON:-python3}
mkdir -p "$CACHE/sdist" "$CACHE/wheels"

# Real Go text/template (Ollama's engine) for the template tests.
if ! command -v go >/dev/null 2>&1; then
  log "installing golang-go (Debian)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go) >&2
fi
# A headless browser for the webui tests (selenium drives Debian's chromium through chromium-driver) and a CJK font
# for the Chinese labels in its screenshots.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 \
    || [ ! -f /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ]; then
  log "installing chromium, chromium-driver and fonts-wqy-zenhei (Debian)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
    fonts-wqy-zenhei) >&2
fi

# llama-cpp-python is source-only: keep its sdist (also our test reference) and build the wheel once.
sdist="$CACHE/sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
  log "downloading llama-cpp-python $LLAMA_VERSION sdist"
  "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$LLAMA_VERSION" -d "$CACHE/sdist" >&2
fi
ref="$CACHE/sdist/llama_cpp_python-$LLAMA_VERSION"
if [ ! -d "$ref/vendor/llama.cpp/models" ]; then
  tar xzf "$sdist" -C "$CACHE/sdist"
fi
# Portable x86-64 build (AVX2/FMA/F16C, llama.cpp's defaults with GGML_NATIVE=OFF): a native build on a Xeon with
# AMX compiles llama.cpp's AMX kernels, and those crash (SIGSEGV in llama_decode) on q8_0/K-quant files here.
CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
wkey=$(printf '%s|%s|%s|%s' "$LLAMA_VERSION" "$CMAKE_ARGS" "$("$PY" -c 'import sys;print(sys.version_info[:2])')" \
  "$(uname -m)" | sha256sum | cut -c1-16)
wdir="$CACHE/wheels/$wkey"
if ! ls "$wdir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  log "building the llama-cpp-python wheel (one time, ~11 min on 2 cores)"
  start=$(date +%s)
  CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PY" -m pip wheel -q --no-deps -w "$wdir.tmp" "$sdist" >&2
  mv "$wdir.tmp" "$wdir"
  log "wheel built in $(( $(date +%s) - start )) s"
fi

# The venv, keyed by the dependency files.
vkey=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
venv="$CACHE/venv-$vkey"
if [ ! -f "$venv/.complete" ]; then
  log "creating $venv"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/pip" install -q torch==2.13.0 >&2
  "$venv/bin/pip" install -q --find-links "$wdir" ".[gguf,quant,parquet,eval,serve,bench,webui,dev]" >&2
  touch "$venv/.complete"   # written last: a half-built venv is rebuilt, never used
else
  # The dependencies are cached; the project itself is reinstalled (non-editable) on every run.
  "$venv/bin/pip" install -q --no-deps --force-reinstall . >&2
fi
"$venv/bin/python" - <<'PY' >&2
import torch
assert torch.version.cuda is None, f"a CUDA build of torch was installed ({torch.version.cuda}); pin torch==2.13.0"
print(f"[setup] torch {torch.__version__} (CPU build)")
PY
# LLaMA-Factory itself, in a venv of its own: the reference of the template parity tests (EXPORTER_LF_PYTHON).
bash scripts/setup_lf.sh
echo "export PATH=\"$venv/bin:\$PATH\""
echo "export EXPORTER_VENV=\"$venv\""
echo "export EXPORTER_LLAMA_SRC=\"$ref\""
# gptqmodel compiles a small CPU kernel on first use (~40 s): keep it with the other caches.
echo "export GPTQMODEL_TORCH_EXTENSIONS_DIR=\"$CACHE/gptqmodel-torch-ext\""
