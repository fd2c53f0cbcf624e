#!/usr/bin/env bash
# Rotate a model, compile it with TVM for this CPU, and benchmark it beside ONNX Runtime.
#
#   examples/compile_tvm_and_bench.sh [MODEL]
#
# MODEL defaults to a tiny random Llama (examples/tiny_model.py). TOKENS (default 1,16) are the
# sequence lengths compiled (TVM artefacts have static shapes) and timed. OUT_DIR (default: a
# new temporary folder) receives rotated.onnx, the artefact folder tvm/ and the JSON results.
# ROTAQ overrides the command (default: rotaq), PYTHON the interpreter (default: python3).
# Needs the TVM extra: pip install 'rotaq[tvm]'.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ROTAQ=${ROTAQ:-rotaq}
PYTHON=${PYTHON:-python3}
TOKENS=${TOKENS:-1,16}
OUT_DIR=${OUT_DIR:-$(mktemp -d)}
MODEL=${1:-}
if [ -z "$MODEL" ]; then
    MODEL=$("$PYTHON" "$here/tiny_model.py" "$OUT_DIR/tiny-llama")
fi

# shellcheck disable=SC2086  # ROTAQ may be a command with arguments (python3 -m rotaq.cli)
$ROTAQ optimize "$MODEL" --recipe rotate -o "$OUT_DIR/rotated.onnx"
$ROTAQ compile "$OUT_DIR/rotated.onnx" --backend tvm --target llvm --tokens "$TOKENS" \
    -o "$OUT_DIR/tvm"
$ROTAQ bench "$OUT_DIR/tvm" --backend tvm --tokens "$TOKENS" --json > "$OUT_DIR/bench-tvm.json"
$ROTAQ bench "$OUT_DIR/rotated.onnx" --backend ort --tokens "$TOKENS" --json \
    > "$OUT_DIR/bench-ort.json"

"$PYTHON" - "$OUT_DIR/bench-tvm.json" "$OUT_DIR/bench-ort.json" <<'PY'
import json
import sys

tvm, ort = (json.load(open(p)) for p in sys.argv[1:3])
print(f"{'tokens':>6} {'TVM ms':>8} {'ORT ms':>8} {'TVM/ORT':>8}")
for n, t in tvm["tokens"].items():
    a, b = t["median_ms"], ort["tokens"][n]["median_ms"]
    print(f"{n:>6} {a:8.3f} {b:8.3f} {a / b:8.2f}")
print(f"TVM artefact {tvm['size_mib']:.2f} MiB, ONNX {ort['size_mib']:.2f} MiB")
PY
