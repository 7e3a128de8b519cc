"""Each change of the recipe, taken away one at a time: its gain on the validation folds.

    python docs/runs/ablation.py PARAMS.yaml OUT_DIR [NAME KEY=VALUE[,KEY=VALUE...]]...

Cross-validates the classification pipeline (`--pipeline` to change it) of PARAMS.yaml as it is
(row `recipe`) and once per variant, each variant overriding dotted settings (e.g.
`no_mixup augment.mixup=0`). Reads data/manifest.csv and data/splits.csv (write them with
`pap-severity data manifest` and `data split --params PARAMS.yaml`); only the validation folds are
scored, never the test part. Finished variants (OUT_DIR/<name>.json) are reused, so a killed run
resumes; one of another pipeline or setting is refused, not reused. Prints a markdown table: each
row's mean ± std over the folds and its paired difference from `recipe` (the same folds, the same
seed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml

from pap_severity.config import Config, load_config, run_definition
from pap_severity.data.manifest import read_manifest
from pap_severity.data.splits import read_splits
from pap_severity.evaluation import fold_metrics
from pap_severity.paired import paired_difference
from pap_severity.training import cross_validate

SHOWN = ("accuracy", "mean_auc", "mse")


def override(cfg: Config, pairs: dict) -> Config:
    raw = cfg.model_dump(mode="json", by_alias=True)
    for key, value in pairs.items():
        section, name = key.split(".", 1)
        raw[section][name] = value
    return Config.model_validate(raw)


def run(cfg: Config, pipeline: str, name: str, out: Path, manifest, splits) -> dict:
    done = out / f"{name}.json"
    definition = run_definition(cfg)
    if done.is_file():
        result = json.loads(done.read_text())
        if (result.get("pipeline"), result.get("definition")) != (pipeline, definition):
            raise SystemExit(f"{done} holds {name} of another pipeline or setting ({result.get('pipeline')}); "
                             "give another OUT_DIR, or delete it to run again")
        return result
    start = time.monotonic()
    predictions = cross_validate(cfg, pipeline, manifest, splits, out / name, resume=True, progress=False)
    val = predictions[predictions["part"] == "val"]
    per_fold = [{k: m[k] for k in SHOWN} for m in fold_metrics(val)]
    result = {"name": name, "pipeline": pipeline, "definition": definition, "seconds": time.monotonic() - start,
              "per_fold": per_fold}
    done.write_text(json.dumps(result, indent=1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("params")
    parser.add_argument("out", type=Path)
    parser.add_argument("variants", nargs="*", help="NAME KEY=VALUE[,KEY=VALUE...] pairs")
    parser.add_argument("--pipeline", default="classification")
    args = parser.parse_args()
    if len(args.variants) % 2:
        parser.error("variants come in pairs: NAME KEY=VALUE[,KEY=VALUE...]")
    base = load_config(args.params)
    manifest, splits = read_manifest("data/manifest.csv"), read_splits("data/splits.csv")
    if "repeat" in splits:  # the first repeat is enough to rank the changes
        splits = splits[splits["repeat"] == 0]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = {"recipe": run(base, args.pipeline, "recipe", args.out, manifest, splits)}
    for name, spec in zip(args.variants[::2], args.variants[1::2]):
        pairs = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in spec.split(",") if kv)}
        rows[name] = run(override(base, pairs), args.pipeline, name, args.out, manifest, splits)
        rows[name]["overrides"] = pairs
    ref = rows["recipe"]["per_fold"]
    print(f"| variant | change | {' | '.join(SHOWN)} | accuracy − recipe [95% interval] |")
    print("|---|---|" + "---|" * len(SHOWN) + "---|")
    for name, row in rows.items():
        values = {k: np.array([f[k] for f in row["per_fold"]]) for k in SHOWN}
        cells = [f"{values[k].mean():.3f} ± {values[k].std(ddof=1):.3f}" for k in SHOWN]
        diff = "—"
        if name != "recipe":
            d = paired_difference(values["accuracy"], [f["accuracy"] for f in ref],
                                  val_fraction=1 / (len(ref) - 1))
            diff = f"{d['mean_diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
        change = ", ".join(f"{k}={v}" for k, v in row.get("overrides", {}).items()) or "the tuned recipe"
        print(f"| {name} | {change} | {' | '.join(cells)} | {diff} |")


if __name__ == "__main__":
    main()
