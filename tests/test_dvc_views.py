"""What `dvc metrics`, `dvc exp show`, `dvc plots` and `dvc status` show a user of this project.

A scratch git + DVC repository holds the project's dvc.yaml, params.yaml and plot templates, with
result files written by the project's own writers (evaluation, comparison, trust, headline) from
made-up predictions, and placeholders for the outputs the views do not read (models, data), so
DVC can save experiments without training anything. The queued experiments at the end do run the
pipeline's commands, on a tiny synthetic set.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_evaluation import fake_predictions
from test_pipeline import TINY  # the whole-pipeline test's tiny settings

from pap_severity.files import write_csv
from pap_severity.headline import HEADLINE, headline, write_headline

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("classification", "regression", "combined", "corn", "sord")
CLASSES = {"1 normal", "2 light", "3 moderate", "4 severe", "5 carcinoma_in_situ"}
VARIANTS = ("single", "ensemble", "ensemble_tta", "final")
WIDTH = 200


def run(project: Path, *args: str, check: bool = True, columns: int | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if columns:
        env["COLUMNS"] = str(columns)
    done = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


def dvc(project: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(project, sys.executable, "-m", "dvc", *args, **kwargs)


def git(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run(project, "git", "-c", "user.name=test", "-c", "user.email=test@example.org", *args)


# Result files ------------------------------------------------------------------------------


def ensemble_outputs(project: Path, pipeline: str, shift: float) -> None:
    """metrics/ensemble/<p>.json and reports/trust/<p>/ through trust.write_outputs, from made-up rows."""
    from pap_severity.ensemble import UNCERTAINTY
    from pap_severity.trust import write_outputs

    rng = np.random.default_rng(len(pipeline))
    tables = []
    for variant in VARIANTS:
        probs = rng.dirichlet(np.ones(5), size=30)
        severity = np.arange(30) % 5
        tables.append(pd.DataFrame({
            "variant": variant, "part": "test", "path": [f"cells/{i:02d}.bmp" for i in range(30)],
            "severity": severity, "pred": probs.argmax(axis=1), "score": probs @ np.arange(1, 6),
            **{f"p{k}": probs[:, k] for k in range(5)}, **{name: rng.random(30) for name in UNCERTAINTY},
            "refer": False}))
    rows = {variant: {"accuracy": 0.5 + shift + i / 100, "mse": 1.2 - shift, "ece_calibrated": 0.05,
                      "aurc": 0.2, "referral_measure": "entropy"} for i, variant in enumerate(VARIANTS)}
    rows["single"]["accuracy"] = {"mean": 0.4 + shift, "std": 0.02, "per_fold": [0.38 + shift, 0.42 + shift]}
    result = {"rows": rows, "predictions": pd.concat(tables, ignore_index=True),
              "spec": {"variant": "ensemble_tta", "referral": {"max_rate": 0.2}}}
    write_outputs(result, pipeline, "synthetic", {}, project / f"models/ensemble/{pipeline}.json",
                  project / f"models/ensemble/{pipeline}.predictions.csv",
                  project / f"metrics/ensemble/{pipeline}.json", project / "reports/trust")


def results(project: Path, shift: float = 0.0) -> None:
    """The files dvc.yaml's metrics and plots read, written by the project's writers."""
    from pap_severity import comparison, evaluation

    predictions = fake_predictions(PIPELINES, folds=2, cells=20, test_cells=10)
    csv = write_csv(predictions, project / "predictions.csv")
    metrics = {}
    for name in PIPELINES:
        metrics[name] = evaluation.evaluate(csv, name, "synthetic", {}, project / "metrics",
                                            project / "reports/figures")["metrics"]
        ensemble_outputs(project, name, shift)
    write_csv(comparison.auc_rows(metrics), project / "reports/figures/auc_per_fold.csv")
    csv.unlink()
    write_headline(PIPELINES, project / "metrics/ensemble", project / "metrics/headline.json")


def placeholders(project: Path) -> None:
    """An empty file or folder for every dep and out of dvc.yaml that is not there (DVC checks they exist)."""
    dvcfile = yaml.safe_load((project / "dvc.yaml").read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    for stage in dvcfile["stages"].values():
        items = params["train"]["pipelines"] if "foreach" in stage else [None]
        if "foreach" in stage and "explain" in stage["foreach"]:
            items = params["explain"]["pipelines"]
        body = stage.get("do", stage)
        for entry in body.get("deps", []) + body.get("outs", []) + body.get("metrics", []):
            name = entry if isinstance(entry, str) else next(iter(entry))
            path = project / name.replace("${data.root}", params["data"]["root"])
            for item in items:
                target = Path(str(path).replace("${item}", item or ""))
                if target.exists():
                    continue
                if target.suffix:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text("placeholder\n")
                else:
                    target.mkdir(parents=True)
                    (target / "placeholder").write_text("placeholder\n")


def set_lr(project: Path, lr: float) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lr"] = lr
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def views(tmp_path_factory) -> Path:
    """The scratch repository with a baseline commit and two experiments saved from it."""
    project = tmp_path_factory.mktemp("views")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, project / name)
    git(project, "init", "-q")
    dvc(project, "init", "-q")
    shutil.copytree(ROOT / ".dvc" / "plots", project / ".dvc" / "plots")
    results(project)
    placeholders(project)
    dvc(project, "commit", "-f", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "baseline")
    for shift, lr in ((0.05, 0.0003), (0.1, 0.003)):  # another result under another setting
        set_lr(project, lr)
        for name in PIPELINES:
            ensemble_outputs(project, name, shift)
        write_headline(PIPELINES, project / "metrics/ensemble", project / "metrics/headline.json")
        dvc(project, "exp", "save", "-f")
        git(project, "checkout", "-q", "--", ".")
        dvc(project, "checkout", "-f", "-q")
    return project


# The headline metric -------------------------------------------------------------------------


def test_the_headline_is_the_served_rows_numbers(tmp_path):
    for name, shift in (("combined", 0.0), ("corn", 0.1)):
        ensemble_outputs(tmp_path, name, shift)
    content = headline(["combined", "corn", "sord"], tmp_path / "metrics/ensemble")
    assert list(content) == ["combined", "corn"]  # sord has no served model yet: left out
    assert content["combined"] == {"acc": pytest.approx(0.52), "mse": pytest.approx(1.2)}  # ensemble_tta's row
    assert content["corn"]["acc"] == pytest.approx(0.62)
    assert set(HEADLINE) == {"acc", "mse"}
    spec = json.loads((tmp_path / "metrics/ensemble/corn.json").read_text())
    spec["served"] = "single"  # a row of mean ± std gives its mean
    (tmp_path / "metrics/ensemble/corn.json").write_text(json.dumps(spec))
    assert headline(["corn"], tmp_path / "metrics/ensemble")["corn"]["acc"] == pytest.approx(0.5)
    (tmp_path / "metrics/ensemble/corn.json").write_text('{"rows": {}}')
    with pytest.raises(ValueError, match=r"corn\.json: not a served-model metrics file.*dvc repro ensemble`"):
        headline(["corn"], tmp_path / "metrics/ensemble")
    with pytest.raises(FileNotFoundError, match="run `dvc repro ensemble` first"):
        write_headline(["sord"], tmp_path / "metrics/ensemble", tmp_path / "headline.json")


def test_the_headline_is_the_only_metric_and_every_detail_is_an_output():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = {name: body.get("do", body).get("metrics", []) for name, body in stages.items()}
    assert {name: m for name, m in declared.items() if m} == {"headline": [{"metrics/headline.json": {"cache": False}}]}
    outs = [next(iter(o)) if isinstance(o, dict) else o for body in stages.values() for o in body.get("do", body)
            .get("outs", [])]
    for detail in ("metrics/combined.json", "metrics/final/combined.json", "metrics/ensemble/combined.json",
                   "reports/validation/validation.json", "reports/explain/${item}/summary.json",
                   "reports/registry.json"):
        assert detail in outs, detail


def test_metrics_show_is_one_short_line_per_file(views):
    shown = json.loads(dvc(views, "metrics", "show", "--json").stdout)
    assert list(shown[""]["data"]) == ["metrics/headline.json"]
    lines = dvc(views, "metrics", "show").stdout.splitlines()
    assert len(lines) == 2 and max(map(len, lines)) <= WIDTH, lines
    diff = dvc(views, "metrics", "diff", "HEAD")
    assert "failed to load" not in diff.stdout + diff.stderr


def test_exp_show_fits_200_columns_with_every_headline_number(views):
    """The README's view: what differs between the experiments, in 200 columns, no number cut."""
    done = dvc(views, "exp", "show", "--no-pager", "--only-changed", "--drop", ".*/", columns=WIDTH)
    lines = done.stdout.splitlines()
    assert max(map(len, lines)) <= WIDTH, done.stdout
    header = next(line for line in lines if "Experiment" in line)
    columns = header.split()
    expected = [f"{p}.{key}" for p in PIPELINES for key in HEADLINE]
    assert [c for c in columns if c in expected] == expected, header
    assert "train.lr" in columns and "…" not in header
    experiments = [line for line in lines if re.search(r"\[[\w-]+\]", line)]
    assert len(experiments) == 2, done.stdout
    for line in experiments:  # every headline value in full: numbers, no ellipsis
        cells = line.split()
        assert "…" not in cells, line
        assert len([c for c in cells if re.fullmatch(r"\d+\.\d+|\d+(\.\d+)?e-?\d+", c)]) >= len(expected) + 1, line
    table = json.loads(dvc(views, "exp", "show", "--json").stdout)
    assert sum(len(baseline.get("experiments") or []) for baseline in table) == 2


def test_plots_have_a_panel_or_colour_per_pipeline_titles_and_scores(views):
    plots = json.loads(dvc(views, "plots", "show", "--json").stdout)["data"]
    vega = {name: items[0]["content"] for name, items in plots.items() if items[0]["type"] == "vega"}
    assert set(vega) == {"confusion_test", "confusion_val", "scores_test", "auc_per_fold", "reliability",
                         "risk_coverage"}
    for name, spec in vega.items():
        points = spec["data"]["values"]
        assert points and {p["pipeline"] for p in points} == set(PIPELINES), name
        assert all(p.get("rev") for p in points), name
        inner = spec.get("spec", spec)
        encoding = inner["encoding"]
        for axis in ("x", "y"):
            title = encoding[axis]["title"]
            assert title and title not in ("x", "y", encoding[axis]["field"]), (name, axis, title)
        if "facet" in spec:  # every facet field is one each data point has
            assert all(all(p.get(f["field"]) for p in points) for f in spec["facet"].values()), name
        else:
            assert encoding["color"]["field"] == "pipeline", name
    for name in ("confusion_test", "confusion_val"):
        spec = vega[name]
        assert spec["facet"]["row"]["field"] == "pipeline" and spec["facet"]["column"]["field"] == "rev"
        # counted before faceting, by the facet fields too: no cell loses its pipeline or revision
        assert set(spec["transform"][0]["groupby"]) == {"rev", "pipeline", "actual", "predicted"}
        assert {p["actual"] for p in spec["data"]["values"]} == CLASSES
    assert {p["class"] for p in vega["auc_per_fold"]["data"]["values"]} == CLASSES
    for name in ("reliability", "risk_coverage"):
        assert vega[name]["facet"]["column"]["field"] == "pipeline"
        assert vega[name]["spec"]["encoding"]["color"]["field"] == "variant"
        assert {p["variant"] for p in vega[name]["data"]["values"]} == set(VARIANTS)
    images = {name for name, items in plots.items() if items[0]["type"] == "image"}
    assert {"reports/trust/combined/reliability.png", "reports/trust/combined/risk_coverage.png"} <= images


def test_a_fresh_clone_has_no_dvc_file_that_reads_as_changed(tmp_path):
    """Every .dvc file git holds must be up to date in a fresh clone (a placeholder import of a zip
    that was never fetched is not)."""
    tracked = run(ROOT, "git", "ls-files", "*.dvc", ".dvc/config", ".dvcignore").stdout.split()
    project = tmp_path / "clone"
    project.mkdir()
    git(project, "init", "-q")
    dvc(project, "init", "-q")
    for name in tracked:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, project / name)
    done = dvc(project, "status")
    assert done.stdout.splitlines()[0] in ("Data and pipelines are up to date.",
                                           "There are no data or pipelines tracked in this project yet."), done.stdout


# Queued experiments ----------------------------------------------------------------------------

@pytest.mark.slow
def test_queued_experiments_log_to_the_projects_mlflow_store(tmp_path):
    """Two experiments queued and run from DVC's temporary copies: their runs are in the project's
    mlflow.db, not in copies thrown away with the temporary folders."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("dvc.yaml", "pyproject.toml", "README.md", ".gitignore"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(project, "init", "-q")
    dvc(project, "init", "-q")
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "baseline")
    # tune, the first stage that logs to MLflow: its parent run of each study records tune.epochs
    for epochs in ("1", "2"):
        dvc(project, "exp", "run", "--queue", "-S", f"tune.epochs={epochs}", "tune")
    done = dvc(project, "exp", "run", "--run-all", "-j", "1", check=False)
    shown = json.loads(dvc(project, "exp", "show", "--json").stdout)
    runs = [exp for baseline in shown for exp in baseline.get("experiments") or []]
    states = [(exp.get("executor") or {}).get("state") for exp in runs]
    assert len(runs) == 2 and not {"failed", "queued", "running"} & set(states), (done.stdout[-3000:],
                                                                                   done.stderr[-3000:], states)
    assert (project / "mlflow.db").is_file(), "the queued runs logged elsewhere"
    with sqlite3.connect(project / "mlflow.db") as db:
        logged = db.execute(
            "SELECT p.value FROM runs r JOIN params p ON p.run_uuid = r.run_uuid "
            "WHERE r.name = 'tune-classification' AND p.key = 'tune.epochs'").fetchall()
        artifacts = {row[0] for row in db.execute("SELECT artifact_location FROM experiments")}
    assert sorted(v for (v,) in logged) == ["1", "2"]
    assert all(str(project.resolve()) in location for location in artifacts if location.startswith("file:")), \
        artifacts
    assert not list((project / ".dvc" / "tmp").rglob("mlflow.db")), "a store was left in DVC's temporary copies"
