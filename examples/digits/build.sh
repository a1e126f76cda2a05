#!/usr/bin/env bash
# Build the digits bundle, show what was signed, and verify it the way a device does.
# Usage: examples/digits/build.sh [OUTDIR]   (needs `edgeship` on PATH)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$(mktemp -d -t edgeship-quickstart.XXXXXX)}
mkdir -p "$OUT"
echo "== 1. a release signing key (ECDSA P-256)"
edgeship keys generate --out "$OUT/keys" --name release --force
echo
echo "== 2. build quantized, signed bundles from $HERE/digits.onnx for both runtimes (--quantize auto, behind the accuracy gate)"
for target in onnx tflite; do
  edgeship build "$HERE/digits.onnx" --name digits --version 1.0.0 --key "$OUT/keys/release.key" \
    --target "$target" --quantize auto --calibration "$HERE/calibration.npz" --eval "$HERE/eval.npz" \
    --labels "$HERE/labels.txt" --sample-inputs "$HERE/samples.npz" -o "$OUT/digits-$target-1.0.0.edge" --force
  echo
done
cp "$OUT/digits-onnx-1.0.0.edge" "$OUT/digits-1.0.0.edge"
echo "== 3. what the bundle holds"
edgeship inspect "$OUT/digits-1.0.0.edge" --key "$OUT/keys/release.pub"
echo
echo "== 4. verify it as a device would (signature, every file's digest, golden self-test on this runtime)"
for target in onnx tflite; do
  edgeship-agent verify "$OUT/digits-$target-1.0.0.edge" --key "$OUT/keys/release.pub" --selftest
done
echo
echo "== 5. a tampered copy is refused"
python3 - "$OUT/digits-1.0.0.edge" "$OUT/tampered.edge" <<'PY'
import sys
data = bytearray(open(sys.argv[1], "rb").read())
data[len(data) // 2] ^= 0x01
open(sys.argv[2], "wb").write(data)
PY
if edgeship-agent verify "$OUT/tampered.edge" --key "$OUT/keys/release.pub"; then
  echo "FAILED: the tampered bundle was accepted" >&2
  exit 1
fi
echo "(refused, as it should be)"
echo
echo "bundle and keys are in $OUT"
