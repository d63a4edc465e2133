#!/usr/bin/env bash
# The GPU measurements issues #3 and #4 still owe, as one script for the next session that has an H100.
#   launch/gpu_pending.sh train   # about 9 min: XL mode-conditional bf16 train step (+ a profile by kernel kind),
#                                 # the memory-saving options, batch 128-256
#   launch/gpu_pending.sh gmm     # about 6 min: full-scale EM with bf16x3_fused / TF32 vs fp32, chunk sizes
# Each part fits one 10-minute call; every line it prints is a figure to record in the README.
# Needs the package importable (pip install -e . or PYTHONPATH=$PWD); writes only stdout and a profile in /tmp.
set -u
part=${1:-}
filter() { grep -v -E "^[WI][0-9]{4} |Warning|warn\(" | grep -E "$1" | tail -"${2:-4}"; }
run() {  # run SECONDS PATTERN LINES CMD... : one bench with a wall-clock limit, keeping the summary lines
  local t=$1 pat=$2 n=$3; shift 3
  local t0; t0=$(date +%s)
  echo "=== $*"
  timeout "$t" "$@" 2>&1 | filter "$pat" "$n"
  echo "--- $(( $(date +%s) - t0 )) s"
}
case "$part" in
  train)
    B=(python -m mmfm_jax.bench train --config=configs/train.py:xl_mode --dtype=bfloat16 --steps=5
       --set model.residual_dtype=bfloat16)
    SAVE=(--set source.table_dtype=bfloat16 --set train.adam_mu_dtype=bfloat16)
    run 130 "^(batch|best)|rror|device time|^  " 30 "${B[@]}" --batch=128 --trace=/tmp/mmfm_trace  # 43.2% (s. 2)
    run 110 "^(batch|best)|rror" 2 "${B[@]}" "${SAVE[@]}" --batch=128        # 4.9 GB less state: remat avoided?
    run 110 "^(batch|best)|rror" 2 "${B[@]}" "${SAVE[@]}" --batch=160
    run 110 "^(batch|best)|rror" 2 "${B[@]}" "${SAVE[@]}" --remat=dots --batch=192
    run 110 "^(batch|best)|rror" 2 "${B[@]}" "${SAVE[@]}" --remat=dots --batch=256
    ;;
  gmm)
    G=(python -m mmfm_jax.bench gmm --scale imagenet --n 262144 --no-sklearn --iters 4)
    P="median\)|lower bound|held-out|compare|vs  |ImageNet scale|rror"
    run 90 "$P" 9 "${G[@]}" --precision=bf16x3_fused --compare=highest   # the candidate: accurate, <= 0.5 s/iter?
    run 90 "$P" 9 "${G[@]}" --precision=tf32_tf32_f32,bf16x3_fused --compare=highest  # TF32 E + 3-pass bf16 M
    for c in 2048 8192 16384; do
      run 60 "$P" 4 "${G[@]}" --precision=bf16x3_fused --chunk=$c
    done
    ;;
  *)
    echo "usage: launch/gpu_pending.sh train|gmm" >&2
    exit 2
    ;;
esac
