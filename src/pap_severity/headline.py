"""metrics/headline.json: the numbers per pipeline that `dvc exp show` and `dvc metrics show` compare.

It is the project's only DVC metric. The detailed files (metrics/<pipeline>.json,
metrics/ensemble/<pipeline>.json, ...) stay outputs that the report and `compare` read: with
every number of them as a metric, `dvc exp show` had hundreds of columns and showed none.

Per pipeline, of its served model (fold ensemble or final model, as `ensemble:` says) on the
held-out test part:
- `acc`: the accuracy over the five classes;
- `mse`: the squared error of its severity score 1..5 (what the paper's regression constraint
  lowers).
Each number is a column of `dvc exp show` headed `<pipeline>.<key>`: two per pipeline, with
the experiment, its date and a changed setting, fill 200 columns
(`dvc exp show --only-changed --drop '.*/'`); a third would push some out. Calibration (ECE)
and referral (AURC, accuracy at 80% coverage) are in metrics/ensemble/<pipeline>.json, and the
mean over the fold models in metrics/<pipeline>.json; reports/index.html shows them all.
"""

from __future__ import annotations

import json
from pathlib import Path

from pap_severity.files import write_json

# key -> the served row's metric in metrics/ensemble/<pipeline>.json
HEADLINE = {"acc": "accuracy", "mse": "mse"}


def _mean(value):
    """A row value: one number, or {mean, std, per_fold} over fold models."""
    return value.get("mean") if isinstance(value, dict) else value


def headline(pipelines: list[str] | tuple[str, ...], ensemble_metrics: Path) -> dict:
    """{pipeline: {key: value}} from each pipeline's metrics/ensemble/<pipeline>.json; a pipeline
    without one is left out."""
    out = {}
    for name in pipelines:
        path = Path(ensemble_metrics) / f"{name}.json"
        if not path.is_file():
            continue
        try:
            content = json.loads(path.read_text())
            row = content["rows"][content["served"]]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValueError(f"{path}: not a served-model metrics file ({exc}); rerun `dvc repro ensemble` "
                             f"(or `pap-severity ensemble -p {name}`)") from None
        out[name] = {key: _mean(row.get(metric)) for key, metric in HEADLINE.items()}
    return out


def write_headline(pipelines: list[str] | tuple[str, ...], ensemble_metrics: Path, out: Path) -> dict:
    """Write metrics/headline.json; raise when no pipeline has been measured."""
    content = headline(pipelines, ensemble_metrics)
    if not content:
        raise FileNotFoundError(f"no served-model metrics in {ensemble_metrics}; run `dvc repro ensemble` first")
    write_json(content, out)
    return content
