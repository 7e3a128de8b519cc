#!/usr/bin/env bash
# Attribution on real cells with masks (herlev-40px): the combined pipeline's served fold ensemble
# beside a single member (docs/runs/attribution.py). Run from the repository root with
# ../shared/datasets beside it; the table goes to docs/results.md.
set -euo pipefail
P=${P:-docs/runs/herlev-40px.params.yaml}
PIPE=${PIPE:-combined}
mkdir -p data
pap-severity data manifest ../shared/datasets/herlev-40px --out data/manifest.csv
pap-severity data split data/manifest.csv --out data/splits.csv --params "$P"
pap-severity train -p "$PIPE" --params "$P" --no-track --resume
pap-severity train-final -p "$PIPE" --params "$P"
pap-severity ensemble -p "$PIPE" --params "$P"
python docs/runs/attribution.py "$P" reports/attribution --pipeline "$PIPE"
