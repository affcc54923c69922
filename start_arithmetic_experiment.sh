#!/usr/bin/env bash
# The arithmetic experiment: a BitNet b1.58 model and its full-precision twin learn problems
# like `12 + 7 = 19` side by side (one CPU core each), then print accuracy per operator,
# PASS/FAIL against the seed's criteria, and an INFRASTRUCTURE verdict.
# Extra arguments go to train_bitnet_arithmetic.py, e.g. --out-dir runs/x --set learning_rate=3e-3,
# or your own stack: --linear SPEC, --model SPEC, --optimizer SPEC, --path DIR (README, "Check your own stack")
set -euo pipefail
cd "$(dirname "$0")"
exec python train_bitnet_arithmetic.py --twin --out-dir runs/arithmetic "$@"
