"""reports/index.html: one page a user can read, linking everything a `dvc repro` produced.

It states the data source, when the page was written and from which commit, then the
data validation, each pipeline's own (tuned) settings, the pipeline comparison (held-out
test part and validation folds, each table saying what it averages), the paired comparison
with the reference pipeline (differences with their intervals and p-values, the paper's
Fig. 7 per pair), each pipeline's figures under its name with its MLflow runs and, where
the explain stage ran, the gallery of its misclassified test cells, the served models and
what they are worth (calibration and referral of every candidate, reliability and
risk-coverage figures), the attribution reports, the final models, and the registered
versions (which one holds the alias, from the registry record) with how to serve it. It reads only the files the stages wrote and links to them (relative
links, so the folder can move); it copies none of them. The page comes from the Jinja2
template `index.html.j2` (autoescaped) and is written atomically.

MLflow links point at an MLflow UI: the tracking server itself when the tracking URI is
http(s), else `mlflow ui` on its default address (the page says how to start it).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from pap_severity.config import LAMBDA_PIPELINES, PIPELINES
from pap_severity.evaluation import HEADLINE_LABELS
from pap_severity.files import write_text
from pap_severity.templates import render

SHOWN = ("accuracy", "balanced_accuracy", "mean_auc", "mse", "qwk", "binary_accuracy", "binary_f1")
EXPLAIN_SHOWN = ("abs_at_n", "abs_at_c", "abs_at_ratio", "abs_at_n_norm", "rand_abs_at_n_norm")
# The columns of a served-model candidate (a row of metrics/ensemble/<pipeline>.json): key, heading.
TRUST_SHOWN = (("accuracy", "accuracy"), ("ece", "ECE before"), ("ece_calibrated", "ECE after"), ("aurc", "AURC"),
               ("accuracy_at_coverage.0.8", "accuracy at 80% coverage"), ("referral_rate", "referral rate"))
# The paired differences shown, in this order (comparison.PAIRED_METRICS also has per-class AUCs, in Fig. 7).
PAIRED_SHOWN = ("accuracy", "balanced_accuracy", "mean_auc", "mse", "qwk")
# Where `mlflow ui` listens unless told otherwise.
MLFLOW_UI = "http://127.0.0.1:5000"
INDEX_FILE = "index.html"


def _read(path: Path):
    """A JSON file's content, None when it is not there; a broken one is a one-line error."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); rerun the stage that writes it") \
            from None


def _href(target: Path, base: Path) -> str | None:
    """A link from a page in `base` to `target`, relative so the folder can move; None when target is missing."""
    return Path(os.path.relpath(target, base)).as_posix() if target.exists() else None


# MLflow links ---------------------------------------------------------------------------


def mlflow_ui(tracking_uri: str) -> tuple[str, str | None]:
    """(base URL of an MLflow UI for this store, the command that starts one, or None for a server)."""
    parts = urlsplit(tracking_uri)
    if parts.scheme in ("http", "https"):
        host = parts.netloc.rpartition("@")[2]  # never a password in a link
        return urlunsplit(parts._replace(netloc=host, query="", fragment="")).rstrip("/"), None
    from pap_severity.tracking import redact

    return MLFLOW_UI, f"mlflow ui --backend-store-uri {redact(tracking_uri)}"


def mlflow_run_url(ui: str, run_id: str, experiment_id: str | None = None) -> str:
    """The UI page of a run (through its experiment when known; the UI finds it from the id alone too)."""
    if experiment_id is not None:
        return f"{ui}/#/experiments/{quote(str(experiment_id), safe='')}/runs/{quote(run_id, safe='')}"
    return f"{ui}/#/runs/{quote(run_id, safe='')}"


def mlflow_version_url(ui: str, name: str, version: str) -> str:
    """The UI page of a registered model version."""
    return f"{ui}/#/models/{quote(name, safe='')}/versions/{quote(str(version), safe='')}"


# Sections -------------------------------------------------------------------------------


def _validation(reports: Path) -> dict | None:
    result = _read(reports / "validation" / "validation.json")
    if result is None:
        return None
    docs = reports / "validation" / "data_docs" / "index.html"
    return {
        "source": result.get("source"),
        "success": bool(result["success"]),
        "n_cells": result["n_cells"],
        "n_checks": result.get("n_checks", "?"),
        "counts": ", ".join(f"{k} {v}" for k, v in result.get("class_counts", {}).items()),
        "failures": result.get("failures", []),
        "docs": _href(docs, reports),
    }


def _setting_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "—" if value is None else str(value)


def _settings(metrics: Path, tuning: Path, pipelines: list[str], ui: str) -> dict | None:
    """Each pipeline's settings (metrics/<p>.json) with what tuning chose (tuning/<p>/best_params.json).

    Values every pipeline shares are stated once; the others, and every tuned one, per pipeline.
    The loss weight lambda is shown only where the pipeline's loss has it.
    """
    from pap_severity.tuning.space import BEST_FILE

    found = {}
    for name in pipelines:
        content = _read(metrics / f"{name}.json")
        if content and content.get("settings"):
            found[name] = (content["settings"], _read(tuning / name / BEST_FILE))
    if not found:
        return None
    tuned_keys = {k for _, best in found.values() if best for k in best.get("params", {})}
    keys = list(dict.fromkeys(k for settings, _ in found.values() for k in settings))
    own = [k for k in keys if k in tuned_keys or len({json.dumps(s.get(k)) for s, _ in found.values()}) > 1]
    shared = [(k, _setting_text(next(iter(found.values()))[0].get(k))) for k in keys if k not in own]
    rows = []
    for name, (settings, best) in found.items():
        unused = {"lambda"} if name in PIPELINES and name not in LAMBDA_PIPELINES else set()
        tuned = None
        if best:
            run = best.get("mlflow_run_id")
            tuned = {
                "params": ", ".join(sorted(best.get("params", {}))),
                "metric": best.get("metric"),
                "value": best.get("value"),
                "n_complete": best.get("n_complete"),
                "n_trials": best.get("n_trials"),
                "run": mlflow_run_url(ui, run) if run else None,
            }
        rows.append({
            "pipeline": name,
            "values": ["— (unused)" if k in unused else _setting_text(settings.get(k)) for k in own],
            "tuned": tuned,
            "record": (tuning / name / BEST_FILE).as_posix(),
        })
    return {"shared": shared, "columns": own, "rows": rows}


def _comparison(reports: Path) -> dict | None:
    comparison = _read(reports / "comparison.json")
    if comparison is None:
        return None
    folds = set(comparison.get("n_folds", {}).values())
    return {
        "labels": [HEADLINE_LABELS[m] for m in SHOWN],
        "n_folds": folds.pop() if len(folds) == 1 else None,
        "test": [{"pipeline": name, "values": [m.get(k) for k in SHOWN],
                  "n_folds": comparison.get("n_folds", {}).get(name),
                  "n_test_cells": comparison.get("n_test_cells", {}).get(name)}
                 for name, m in comparison["test"].items()],
        "validation": [{"pipeline": name, "values": [m.get(k) for k in SHOWN]}
                       for name, m in comparison.get("validation", {}).items()],
        "paper": [{"pipeline": name, "values": [fig.get(k) for k in SHOWN]}
                  for name, fig in comparison.get("paper", {}).items()],
        "table": _href(reports / "comparison.md", reports),
    }


def _paired(reports: Path) -> dict | None:
    """The paired comparison of reports/comparison.json: a row per (pipeline, metric) against the
    reference, the served models' bootstrap on the test part, the notes, and the Fig. 7 images."""
    comparison = _read(reports / "comparison.json")
    if comparison is None or "reference" not in comparison:
        return None
    reference = comparison["reference"]
    rows = []
    for name, metrics in comparison.get("paired", {}).items():
        shown = [m for m in PAIRED_SHOWN if m in metrics]
        for i, metric in enumerate(shown):
            r = metrics[metric]
            rows.append({"pipeline": name, "span": len(shown) if i == 0 else 0,
                         "metric": HEADLINE_LABELS.get(metric, metric), "mean_diff": r.get("mean_diff"),
                         "ci95": r.get("ci95"), "p_value": r.get("p_value"), "n": r.get("n"),
                         "reason": r.get("reason")})
    test = [{"pipeline": name, **r["accuracy"]} for name, r in comparison.get("paired_test", {}).items()]
    figures = [{"pipeline": name, "href": _href(reports / "figures" / "paired" / f"{name}_vs_{reference}.png",
                                                reports)}
               for name in comparison.get("paired", {})]
    return {"reference": reference, "part": comparison.get("part"), "interval": comparison.get("interval"),
            "test_name": comparison.get("significance_test"), "rows": rows, "test": test,
            "notes": comparison.get("notes", []), "figures": [f for f in figures if f["href"]]}


def _mean_std(value) -> dict:
    """A row value as {mean, std}: the `single` row holds mean ± std over fold models, the others one value."""
    if isinstance(value, dict):
        return {"mean": value.get("mean"), "std": value.get("std")}
    return {"mean": value, "std": None}


def _lookup(row: dict, key: str):
    """row["a.b"] as row["a"]["b"]; the coverage keys ("0.8") hold a dot of their own."""
    head, _, rest = key.partition(".")
    value = row.get(head)
    return value.get(rest) if rest and isinstance(value, dict) else value


def _trust(reports: Path, metrics: Path, models: Path, pipelines: list[str]) -> list[dict]:
    """Per pipeline: its served model (models/ensemble/<p>.json) and every candidate measured on the
    test part (metrics/ensemble/<p>.json), with the reliability and risk-coverage figures."""
    sections = []
    for name in pipelines:
        measured = _read(metrics / "ensemble" / f"{name}.json")
        if measured is None:
            continue
        spec = _read(models / "ensemble" / f"{name}.json") or {}
        referral = spec.get("referral", {})
        folder = reports / "trust" / name
        sections.append({
            "pipeline": name,
            "served": measured.get("served"),
            "members": len(spec.get("members", [])) or None,
            "tta": spec.get("tta"),
            "temperature": spec.get("temperature"),
            "measure": referral.get("measure"),
            "max_rate": referral.get("max_rate"),
            "n_test_cells": measured.get("n_test_cells"),
            "n_calibration_cells": measured.get("n_calibration_cells"),
            "rows": [{"variant": variant, "served": variant == measured.get("served"),
                      "values": [_mean_std(_lookup(row, key)) for key, _ in TRUST_SHOWN]}
                     for variant, row in measured.get("rows", {}).items()],
            "figures": [{"href": _href(folder / f"{stem}.png", reports), "caption": caption}
                        for stem, caption in (("reliability", "reliability after temperature"),
                                              ("risk_coverage", "risk against coverage"))
                        if (folder / f"{stem}.png").exists()],
        })
    return sections


def _pipeline_figures(reports: Path, models: Path, pipelines: list[str], ui: str) -> list[dict]:
    """Per pipeline: its test figures, the gallery of its misclassified cells, its MLflow runs."""
    from pap_severity.explain.files import GALLERY_FILE
    from pap_severity.tracking import RUNS_FILE

    sections = []
    for name in pipelines:
        folder = reports / "figures" / name
        # The gallery is linked from the confusion matrix's caption, or from the section when there is none.
        figures = [{"href": _href(folder / f"{stem}.png", reports), "caption": caption,
                    "links_gallery": stem == "confusion_test"}
                   for stem, caption in (("confusion_test", "confusion matrix, test part"),
                                         ("scores_test", "predicted score per true class, test part"))
                   if (folder / f"{stem}.png").exists()]
        gallery = reports / "explain" / name / GALLERY_FILE
        runs = _read(models / name / RUNS_FILE) or {}
        experiment = runs.get("experiment_id")
        parent = runs.get("parent_run_id")
        folds = [(k, mlflow_run_url(ui, fold["run_id"], experiment))
                 for k, fold in sorted(runs.get("folds", {}).items(), key=lambda item: int(item[0]))
                 if fold.get("run_id")]
        if not figures and not parent:
            continue
        sections.append({
            "pipeline": name,
            "figures": figures,
            "gallery": _href(gallery, reports),
            "gallery_in_caption": any(f["links_gallery"] for f in figures),
            "run": mlflow_run_url(ui, parent, experiment) if parent else None,
            "folds": folds,
        })
    return sections


def _explain(reports: Path) -> list[dict]:
    from pap_severity.explain.files import ATTRIBUTIONS_FILE, GALLERY_FILE, REPORT_FILE, SUMMARY_FILE

    parts = []
    for summary_file in sorted((reports / "explain").glob(f"*/{SUMMARY_FILE}")):
        summary = _read(summary_file)
        folder = summary_file.parent
        gallery = folder / GALLERY_FILE
        parts.append({
            "pipeline": folder.name,
            "baseline": summary["settings"].get("baseline"),
            "n_cells": summary["n_cells"],
            "report": _href(folder / REPORT_FILE, reports),
            "attributions": _href(folder / ATTRIBUTIONS_FILE, reports),
            "gallery": _href(gallery, reports),
            "rows": [{"class": name, "n": v.get("n", ""), "values": [v.get(k) for k in EXPLAIN_SHOWN]}
                     for name, v in summary.get("per_class", {}).items()],
        })
    return parts


def _final(metrics: Path) -> list[dict]:
    rows = []
    for path in sorted((metrics / "final").glob("*.json")):
        m = _read(path)
        rows.append({"pipeline": m["pipeline"], "values": [m.get(k) for k in SHOWN]})
    return rows


def alias_state(record: dict) -> str:
    """Who holds the alias, from a registry record: this version, another, or none, never two of these."""
    if "champion_version" in record:
        holder = record["champion_version"]
        if holder is None:
            return "held by no version"
        return "held by this version" if str(holder) == str(record["version"]) else f"held by v{holder}"
    return "held by this version" if record.get("promoted") else "not held by this version"


def _registry(reports: Path, ui: str) -> dict | None:
    registry = _read(reports / "registry.json")
    if registry is None:
        return None
    rows = [{
        "name": r["name"],
        "version": str(r["version"]),
        "version_url": mlflow_version_url(ui, r["name"], r["version"]),
        "alias": alias_state(r),
        "decision": ("promoted" if r.get("promoted") else "not promoted")
        + (f" ({r['reason']})" if r.get("reason") else ""),
        "run": mlflow_run_url(ui, r["run_id"]) if r.get("run_id") else None,
        "missing": r.get("missing_artifacts") or [],
    } for r in registry]
    return {"rows": rows, "bento": _read(reports / "bento.json")}


# The page -------------------------------------------------------------------------------


def write_index(reports: str | Path = "reports", metrics: str | Path = "metrics", pipelines: tuple[str, ...] = (),
                *, models: str | Path = "models", tuning: str | Path = "tuning",
                tracking_uri: str = "sqlite:///mlflow.db", alias: str = "champion") -> Path:
    """Write reports/index.html from what the stages left; a missing part says which stage makes it.

    pipelines: their order on the page (default: those of reports/comparison.json).
    tracking_uri: the MLflow store the runs are in, for the links; alias: the registry alias.
    """
    from pap_severity.tracking import git_commit

    reports, metrics, models, tuning = Path(reports), Path(metrics), Path(models), Path(tuning)
    validation = _validation(reports)
    comparison = _comparison(reports)
    names = list(pipelines) or [row["pipeline"] for row in (comparison or {}).get("test", [])]
    ui, start = mlflow_ui(tracking_uri)
    page = render(
        "index.html.j2",
        source=(validation or {}).get("source"),
        written=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        commit=git_commit(),
        mlflow={"ui": ui, "start": start},
        alias=alias,
        validation=validation,
        settings=_settings(metrics, tuning, names, ui),
        comparison=comparison,
        auc_figure=_href(reports / "figures" / "auc_per_fold.png", reports),
        paired=_paired(reports),
        pipelines=_pipeline_figures(reports, models, names, ui),
        trust={"labels": [label for _, label in TRUST_SHOWN], "pipelines": _trust(reports, metrics, models, names)},
        explain=_explain(reports),
        explain_shown=EXPLAIN_SHOWN,
        final={"labels": [HEADLINE_LABELS[m] for m in SHOWN], "rows": _final(metrics)},
        registry=_registry(reports, ui),
    )
    return write_text(reports / INDEX_FILE, page)
