#!/usr/bin/env bash
# Off-source recipe runs (issue 24): each recipe trained on ../shared/data/faces only (as a pack of ready-made
# crops, shards/faces, or through the face stage, shards/faces_fs), then judged on:
#   same-source val AUC, the --robustness summary, dfdc-dev AUC (--set), ffpp-dev frame and video AUC.
# dfdc-dev and ffpp-dev are evaluation only: nothing here trains or picks a threshold on them.
# Usage: bash docs/experiments/offsource.sh NAME [NAME ...]   (names below); results: python docs/experiments/offsource_table.py
set -u
cd "$(dirname "$0")/../.."
D=../shared/data
mkdir -p runs/off
train() {  # name, pack, train flags...
  name=$1; pack=$2; shift 2
  out=runs/off/$name
  if [ ! -f $out/summary.json ]; then
    rm -rf $out
    start=$(date +%s)
    python pipeline/train.py --cpu --data $pack --out $out --backend torch --workers 2 "$@" > runs/off/$name.train.log 2>&1
    echo "$name train rc=$? $(( $(date +%s) - start )) s $(date -u +%H:%M)" >> runs/off/times.txt
  fi
}
judge() {  # name, pack
  name=$1; pack=$2; out=runs/off/$name
  [ -f $out/eval_val/metrics.json ] || python pipeline/evaluate.py --checkpoint $out --data $pack --split val \
      --robustness --out $out/eval_val --workers 2 > runs/off/$name.val.log 2>&1
  [ -f $out/eval_dfdc/metrics.json ] || python pipeline/evaluate.py --checkpoint $out \
      --set dfdc=$D/dfdc-dev/real,$D/dfdc-dev/fake --scoring resize --out $out/eval_dfdc --workers 2 > runs/off/$name.dfdc.log 2>&1
  [ -f $out/eval_ffpp/metrics.json ] || python pipeline/evaluate.py --checkpoint $out --faces on \
      --real $D/ffpp-dev/real --fake $D/ffpp-dev/fake --out $out/eval_ffpp --workers 2 > runs/off/$name.ffpp.log 2>&1
  echo "$name judged $(date -u +%H:%M)" >> runs/off/times.txt
}
SMALL="--model deepfakenet_small --image-size 96"
for spec in "$@"; do
  case $spec in
    # the README's CPU recipe of the previous round (ready-made crops, no self-blending), 14 epochs
    R0) train R0 shards/faces $SMALL --epochs 14; judge R0 shards/faces ;;
    # the same faces through the face stage (framing of the videos), fakes + face-aware self-blending
    R1) train R1 shards/faces_fs $SMALL --epochs 8 --self-blend 0.5 --sbi-mask face; judge R1 shards/faces_fs ;;
    # the same with the default (ellipse) mask: the mask comparison
    R2) train R2 shards/faces_fs $SMALL --epochs 8 --self-blend 0.5 --sbi-mask ellipse; judge R2 shards/faces_fs ;;
    # real faces only: pseudo-fakes are the only fakes seen (SBI's own recipe)
    R3) train R3 shards/faces_fs $SMALL --epochs 16 --self-blend 0.5 --fakes sbi-only; judge R3 shards/faces_fs ;;
    # the same with the default (ellipse) mask: the mask comparison on SBI's own recipe
    R3e) train R3e shards/faces_fs $SMALL --epochs 16 --self-blend 0.5 --fakes sbi-only --sbi-mask ellipse; judge R3e shards/faces_fs ;;
    # ImageNet-pretrained EfficientNet-Lite0 (offline weights), face stage, fakes + face-aware self-blending
    R4) train R4 shards/faces_fs --model timm/tf_efficientnet_lite0 --pretrained efficientnet-lite0 --image-size 128 \
            --epochs 2 --batch-size 32 --self-blend 0.5; judge R4 shards/faces_fs ;;
    # the same backbone on SBI's own recipe (real faces only, face-aware pseudo-fakes); reals are half the
    # images, so 4 epochs see as many images as R4's 2
    R5) train R5 shards/faces_fs --model timm/tf_efficientnet_lite0 --pretrained efficientnet-lite0 --image-size 128 \
            --epochs 4 --batch-size 32 --self-blend 0.5 --fakes sbi-only; judge R5 shards/faces_fs ;;
    # R5 trained 4x longer (16 epochs, about the CPU recipe's 30-minute budget on an idle 2-core machine)
    R6) train R6 shards/faces_fs --model timm/tf_efficientnet_lite0 --pretrained efficientnet-lite0 --image-size 128 \
            --epochs 16 --batch-size 32 --self-blend 0.5 --fakes sbi-only; judge R6 shards/faces_fs ;;
    # R6 at 176 px in about the same training time (10 epochs; 1.2x R6's in the event): resolution against epochs
    R7) train R7 shards/faces_fs --model timm/tf_efficientnet_lite0 --pretrained efficientnet-lite0 --image-size 176 \
            --epochs 10 --batch-size 32 --self-blend 0.5 --fakes sbi-only; judge R7 shards/faces_fs ;;
  esac
done
