#!/usr/bin/env bash
# GPU measurements that docs/benchmarks.md does not have yet, as one script for an H100/H200 machine.
#   launch/gpu_pending.sh train   # about 9 min: XL mode-conditional bf16 train step (+ a profile by kernel kind),
#                                 # the memory-saving options, batch 128-256
#   launch/gpu_pending.sh gmm     # about 9.5 min: full-scale EM, sparse M-step / bf16x3_fused / TF32 vs fp32,
#                                 # chunks, E-step / M-step seconds, the float64 path
# Each part fits one 10-minute call; every line it prints is a figure to record in docs/benchmarks.md.
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
    P="$P|left-out|seconds per iteration|E-step|iteration /"
    # sparse M-step (no M-step GEMM once EM settles; exact_top on with a TF32 E-step): the likeliest <= 0.5 s/iter
    run 100 "$P" 15 "${G[@]}" --precision=tf32_tf32_f32,highest --m-step-top=2 --iters 8 --compare=highest
    run 80 "$P" 9 "${G[@]}" --precision=bf16x3_fused --m-step-top=2 --iters 8
    run 90 "$P" 12 "${G[@]}" --precision=bf16x3_fused --compare=highest   # dense 3-pass bf16: <= 0.5 s/iter?
    run 75 "$P" 9 "${G[@]}" --precision=tf32_tf32_f32,bf16x3_fused  # TF32 E + 3-pass bf16 M
    for c in 2048 8192; do
      run 70 "$P" 9 "${G[@]}" --precision=tf32_tf32_f32,highest --m-step-top=2 --iters 8 --chunk=$c
    done
    run 80 "$P" 9 "${G[@]}" --dtype=float64 --n 65536 --iters 3   # the float64 path (FP64 GEMMs)
    ;;
  *)
    echo "usage: launch/gpu_pending.sh train|gmm" >&2
    exit 2
    ;;
esac
