#!/usr/bin/env bash
# Shifted val copies (runs/exp2/make_proxy.py: 400+400 val images resized to 128 / 384 px, JPEG q80), scored
# with the scoring given (NAME:MODE), once its own evals are done.
cd "$(dirname "$0")/../.."
for spec in "$@"; do
  name=${spec%%:*}; mode=${spec##*:}
  out=runs/exp2/$name
  while [ ! -f $out/eval_robust/robustness.json ]; do sleep 20; done
  [ -f $out/eval_proxy_$mode/metrics.json ] || python pipeline/evaluate.py --checkpoint $out \
      --set s128=runs/proxy/s128/real,runs/proxy/s128/fake --set s384=runs/proxy/s384/real,runs/proxy/s384/fake \
      --scoring $mode --out $out/eval_proxy_$mode --workers 2 > runs/exp2/$name.proxy.log 2>&1
  echo "$name proxy done $(date -u +%H:%M)" >> runs/exp2/times.txt
done
