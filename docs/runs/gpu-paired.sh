#!/usr/bin/env bash
# Issue 12, GPU path: the paired comparison, classification against combined, at the paper's
# architecture (ResNet-50, 224 px, from scratch), on the same repeated splits, in ONE device call
# of at most 10 minutes (device tool, README "Run it on a GPU"). Prepare on the development
# machine, from the repository root:
#
#   echo /.gpu/ >> .git/info/exclude && mkdir -p .gpu
#   cp -r ../shared/datasets/herlev-jpg .gpu/herlev-jpg          # never committed: git-ignored
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 -d .gpu/whl pydantic==2.12.5 pydantic-core==2.41.5 \
#     annotated-types==0.7.0 typing-inspection==0.4.2 captum==0.9.0     # what the GPU image lacks
#
# then run it there with carry [".gpu"]:  bash docs/runs/gpu-paired.sh
# It writes reports/comparison.{md,json}, the per-pipeline metrics and the paired Fig. 7 to $OUT.
# GPU_PAIRED_PARAMS overrides the params file (a tiny one checks the script on a CPU).
set -euo pipefail
P=${GPU_PAIRED_PARAMS:-docs/runs/herlev-jpg-gpu-paired.params.yaml}
OUT=${OUT:-out-gpu-paired}
mkdir -p "$OUT"
if compgen -G ".gpu/whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
run() { python3 -m pap_severity "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee "$OUT/gpu.txt" || true
start=$(date +%s)
root=$(python3 -c "import yaml,sys; print(yaml.safe_load(open('$P'))['data']['root'])")
run data manifest "$root" --out data/manifest.csv
run data split data/manifest.csv --out data/splits.csv --params "$P"
for p in classification combined; do
  run train --pipeline "$p" --params "$P" --no-track
  run evaluate --pipeline "$p" --params "$P" --no-track
  echo "$p done after $(( $(date +%s) - start )) s" | tee -a "$OUT/timing.txt"
done
# compare pairs the pipelines trained here (the others are named as missing)
run compare --params "$P" | tee "$OUT/comparison.txt"
cp reports/comparison.md reports/comparison.json metrics/classification.json metrics/combined.json "$OUT"/
cp reports/figures/paired/*.png reports/figures/auc_per_fold.png "$OUT"/ 2>/dev/null || true
echo "total $(( $(date +%s) - start )) s" | tee -a "$OUT/timing.txt"
