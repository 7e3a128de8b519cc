#!/usr/bin/env bash
# The from-scratch recipe on real Herlev (herlev-jpg), classification against combined, on the
# same 4 folds x 2 repeats: cross-validation, final models, the served ensembles (calibrated, with
# dihedral TTA and referral), then the paired comparison. On 2 CPU cores the two pipelines train side
# by side, one thread each. Resumable: rerun after an interruption (train --resume).
# Run from the repository root with ../shared/datasets beside it; results in docs/results.md.
set -euo pipefail
P=${P:-docs/runs/herlev-jpg-recipe.params.yaml}
PIPELINES=${PIPELINES:-"classification combined"}
mkdir -p data logs
[ -f data/manifest.csv ] || pap-severity data manifest ../shared/datasets/herlev-jpg --out data/manifest.csv
[ -f data/splits.csv ] || pap-severity data split data/manifest.csv --out data/splits.csv --params "$P"
run() {
  local p=$1
  pap-severity train -p "$p" --params "$P" --no-track --resume
  pap-severity evaluate -p "$p" --params "$P" --no-track
  pap-severity train-final -p "$p" --params "$P"
  pap-severity ensemble -p "$p" --params "$P"
}
for p in $PIPELINES; do run "$p" > "logs/$p.log" 2>&1 & done
wait
pap-severity compare --params "$P"
