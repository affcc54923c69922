#!/usr/bin/env bash
# TinyStories: train the 2,048-token tokenizer (skipped when OUT/tokenizer/tokenizer.json exists),
# then BitNet b1.58 on the shared trainer. Extra arguments go to train_bitnet_tiny.py, e.g.
#   ./start_tinystories_experiment.sh --data-dir ../shared/data/tinystories --out-dir runs/ts
# Without --data-dir/--train-file/--val-file the data is streamed from the hub. Your own stack:
# --linear SPEC, --model SPEC, --optimizer SPEC, --path DIR pass through (README, "Check your own stack").
# --data SPEC [--data-kwargs JSON]: your loader's batches beside ours instead of the twin
# (README, "Check your own data").
set -euo pipefail
cd "$(dirname "$0")"

OUT=runs/tinystories TOK="" DATA=() PAIR=--twin
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do  # the flags the tokenizer step needs too
  case "${args[i]}" in
    --out-dir) OUT="${args[i+1]}" ;;
    --out-dir=*) OUT="${args[i]#*=}" ;;
    --tokenizer) TOK="${args[i+1]}" ;;
    --tokenizer=*) TOK="${args[i]#*=}" ;;
    --data-dir | --train-file | --val-file) DATA+=("${args[i]}" "${args[i+1]}") ;;
    --data-dir=* | --train-file=* | --val-file=*) DATA+=("${args[i]}") ;;
    --data | --data=*) PAIR="" ;;  # ours vs yours replaces ternary vs twin
  esac
done
TOK="${TOK:-$OUT/tokenizer}"

if [ -f "$TOK/tokenizer.json" ]; then
  echo "tokenizer: using $TOK/tokenizer.json"
else
  python train_tinystories_tokenizer.py --out-dir "$TOK" --vocab-size 2048 ${DATA[@]+"${DATA[@]}"}
fi

exec python train_bitnet_tiny.py ${PAIR:+"$PAIR"} --out-dir "$OUT" --tokenizer "$TOK" "$@"
