#!/usr/bin/env bash
# Quality runs for issues 14/15 at one budget: deepfakenet_small, 96 px, batch 64, 6 epochs of the train split
# (146 steps each = 876 steps, 56k samples; --fakes sbi-only halves an epoch, so it gets 12 epochs: same steps).
set -u
cd "$(dirname "$0")/../.."
run() {  # name, epochs, train flags...
  name=$1; ep=$2; shift 2
  out=runs/exp2/$name
  if [ ! -f $out/summary.json ]; then
    rm -rf $out
    start=$(date +%s)
    python pipeline/train.py --cpu --data shards/faces --out $out --model deepfakenet_small --image-size 96 \
        --epochs $ep --backend torch --workers 2 "$@" > runs/exp2/$name.train.log 2>&1
    echo "$name train rc=$? $(( $(date +%s) - start )) s $(date -u +%H:%M)" >> runs/exp2/times.txt
  fi
  start=$(date +%s)
  for mode in resize center full tiles; do
    [ -f $out/eval_$mode/metrics.json ] || python pipeline/evaluate.py --checkpoint $out --data shards/faces \
        --split val --scoring $mode --out $out/eval_$mode --workers 2 > runs/exp2/$name.eval_$mode.log 2>&1
  done
  [ -f $out/eval_robust/robustness.json ] || python pipeline/evaluate.py --checkpoint $out --data shards/faces \
      --split val --robustness --out $out/eval_robust --workers 2 > runs/exp2/$name.robust.log 2>&1
  echo "$name eval done $(( $(date +%s) - start )) s $(date -u +%H:%M)" >> runs/exp2/times.txt
}
for spec in "$@"; do
  case $spec in
    A) run A_resize_seed 6 --aug seed ;;
    E) run E_resize_seed_sbi25 6 --aug seed --self-blend 0.25 ;;
    F) run F_resize_seed_sbionly 12 --aug seed --self-blend 0.5 --fakes sbi-only ;;
    B) run B_crop_artifact_npr 6 --aug artifact --input-filter npr ;;
    C) run C_crop_seed_npr 6 --aug seed --preprocess crop --input-filter npr ;;
    D) run D_crop_artifact 6 --aug artifact ;;
    G) run G_crop_artifact_npr_sbi25 6 --aug artifact --input-filter npr --self-blend 0.25 ;;
  esac
done
