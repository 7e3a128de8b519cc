"""At_N / At_C of a served fold ensemble beside one of its members, on the held-out test part.

    python docs/runs/attribution.py PARAMS.yaml OUT_DIR [--pipeline combined]

Does the ensemble look where its members look? Explains, with the settings of PARAMS.yaml's
`explain` section, (a) the served model of models/ensemble/<pipeline>.json (fold ensemble, TTA,
temperature, as `pap-severity ensemble` wrote it) and (b) its first member alone (no TTA, no
temperature), on the same test cells (data/manifest.csv, data/splits.csv). Writes each report under
OUT_DIR/{ensemble,single}/ and prints a markdown table of the per-class means side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pap_severity.config import load_config
from pap_severity.data.manifest import read_manifest
from pap_severity.data.splits import held_out, read_splits
from pap_severity.explain import explain_report
from pap_severity.stages import served_bundle
from pap_severity.tracking import data_source_of

SHOWN = (("at_n", "At_N"), ("at_c", "At_C"), ("abs_at_n_norm", "|At_N|/px"), ("abs_at_c_norm", "|At_C|/px"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("params")
    ap.add_argument("out", type=Path)
    ap.add_argument("--pipeline", default="combined")
    args = ap.parse_args()
    cfg = load_config(args.params)
    spec = json.loads(Path(f"models/ensemble/{args.pipeline}.json").read_text())
    single = {**spec, "members": spec["members"][:1], "tta": "none", "temperature": 1.0}
    table = read_manifest("data/manifest.csv")
    test = held_out(read_splits("data/splits.csv"))[["path"]].merge(
        table[["path", "mask_path", "class_name", "severity"]], on="path")
    source = data_source_of(table)
    settings = cfg.explain.model_copy(update={"sanity_check": False})  # the explain stage runs it; here it would double the time
    summaries = {}
    for name, s in (("ensemble", spec), ("single", single)):
        summaries[name] = explain_report(served_bundle(s), test, settings, args.out / name, data_source=source)
    (args.out / "side_by_side.json").write_text(json.dumps(summaries, indent=1, default=float))
    head = " | ".join(f"{label} {who}" for _, label in SHOWN for who in ("single", "ensemble"))
    print(f"| class | {head} |\n|---|" + "---|" * (2 * len(SHOWN)))
    for cls, row in summaries["ensemble"]["per_class"].items():
        one = summaries["single"]["per_class"][cls]
        cells = " | ".join(f"{one[m]:.3g} | {row[m]:.3g}" for m, _ in SHOWN)
        print(f"| {cls} (n={row['n']}) | {cells} |")
    for name, s in summaries.items():
        print(f"{name}: accuracy {s['accuracy']:.3f} on {s['n_cells']} test cells; "
              f"IG delta over threshold: {s['delta']['over_threshold']}")


if __name__ == "__main__":
    main()
