#!/usr/bin/env bash
# A deployment step: optimize with the rotaq command, check its exit code, then read its JSON
# report and refuse the model if the verified error is over a bound.
#
#   examples/deploy_pipeline.sh [MODEL] [RECIPE] [MAX_ERROR]
#
# MODEL defaults to a tiny random Llama (examples/tiny_model.py), RECIPE to rotate (a built-in
# name or a recipe file such as examples/recipes/rotate-w4-mlp.json), MAX_ERROR to 1e-4.
# OUT_DIR (default: a new temporary folder) receives model.onnx, its tokenizer and report.json.
# ROTAQ overrides the command (default: rotaq), PYTHON the interpreter (default: python3).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ROTAQ=${ROTAQ:-rotaq}
PYTHON=${PYTHON:-python3}
RECIPE=${2:-rotate}
MAX_ERROR=${3:-1e-4}
OUT_DIR=${OUT_DIR:-$(mktemp -d)}
MODEL=${1:-}
if [ -z "$MODEL" ]; then
    MODEL=$("$PYTHON" "$here/tiny_model.py" "$OUT_DIR/tiny-llama") || exit 1
fi

# shellcheck disable=SC2086  # ROTAQ may be a command with arguments (python3 -m rotaq.cli)
$ROTAQ optimize "$MODEL" --recipe "$RECIPE" -o "$OUT_DIR/model.onnx" --json \
    > "$OUT_DIR/report.json"
rc=$?
case $rc in
    0) ;;
    2) echo "deploy: rejected: bad input or refused rewrite (see the message above)" >&2; exit 2 ;;
    3) echo "deploy: rejected: verification failed; nothing was written" >&2; exit 3 ;;
    *) echo "deploy: rotaq failed (exit $rc); rerun with: $ROTAQ --debug optimize ..." >&2
       exit 1 ;;
esac

"$PYTHON" "$here/check_report.py" "$OUT_DIR/report.json" --max-error "$MAX_ERROR" || exit $?
echo "deploy: accepted $OUT_DIR/model.onnx"
