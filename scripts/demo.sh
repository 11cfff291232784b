#!/usr/bin/env bash
# The identity demo on CPU: install (cached), build a tiny Llama-3-style model, then
# train -> merge -> gguf (f16, q8_0, q4_k_m) -> verify with `exporter pipeline data/demo.yaml`.
# Asks nothing; prints where everything is and the `ollama create` commands. Rerunning skips finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${EXPORTER_VENV:-}" ] || eval "$(bash scripts/setup.sh)"
RUN=${RUN:-runs/demo}
BASE=${BASE:-$RUN-base}   # beside the run dir: a pipeline run dir holds only what the pipeline writes
start=$(date +%s)
if [ ! -f "$BASE/config.json" ]; then
  echo "[demo] building the tiny base model into $BASE"
  "$EXPORTER_VENV/bin/python" scripts/make_tiny_model.py llama3 "$BASE"
fi
set +e
"$EXPORTER_VENV/bin/exporter" pipeline data/demo.yaml "base=$BASE" "run_dir=$RUN" "$@"
rc=$?
set -e
echo "[demo] finished in $(( $(date +%s) - start )) s (exit $rc)"
exit "$rc"
