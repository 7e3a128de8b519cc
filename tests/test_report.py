"""reports/index.html from a minimal set of result files: what it states, what it links, what it escapes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pap_severity import stages
from pap_severity.config import Config
from pap_severity.report import alias_state, mlflow_ui, write_index
from pap_severity.tracking import git_commit

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"arch": "resnet18", "image_size": 48, "folds": 3, "epochs": 4, "optimizer": "adamw", "seed": 0}


def test_an_empty_run_says_which_stage_makes_each_part(tmp_path):
    page = write_index(tmp_path / "reports", tmp_path / "metrics").read_text()
    for stage in ("validate", "compare", "ensemble", "explain", "register"):
        assert f"<code>{stage}</code>" in page
    assert "No final models yet" in page


def test_a_herlev_run_is_labelled_herlev(tmp_path):
    (tmp_path / "reports" / "validation").mkdir(parents=True)
    (tmp_path / "reports" / "validation" / "validation.json").write_text(
        '{"success": true, "n_cells": 917, "n_checks": 12, "source": "herlev", "class_counts": {}, "failures": []}'
    )
    page = write_index(tmp_path / "reports", tmp_path / "metrics").read_text()
    assert "Data source: <b>Herlev</b>" in page and "917 cells, 12 checks" in page
    assert "<b>synthetic</b>" not in page


def put(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))


def minimal_run(root: Path) -> None:
    """The files the stages leave, as small as the page allows: two pipelines, one explained and registered."""
    put(root / "reports/validation/validation.json",
        {"success": True, "n_cells": 40, "n_checks": 12, "source": "synthetic", "class_counts": {}, "failures": []})
    per_pipeline = {
        "classification": {**SETTINGS, "lr": 0.0002734, "weight_decay": 1.45e-4, "lambda": 1.0},
        "combined": {**SETTINGS, "lr": 0.0001648, "weight_decay": 2.2e-5, "lambda": 1.3696},
    }
    for name, settings in per_pipeline.items():
        put(root / f"metrics/{name}.json", {"pipeline": name, "settings": settings})
        put(root / f"reports/figures/{name}/confusion_test.png", b"png")
        put(root / f"reports/figures/{name}/scores_test.png", b"png")
    put(root / "tuning/combined/best_params.json",
        {"metric": "accuracy", "value": 0.61, "params": {"lr": 0.0001648, "weight_decay": 2.2e-5, "lambda": 1.3696},
         "n_trials": 3, "n_complete": 3, "mlflow_run_id": "tune-run"})
    put(root / "reports/figures/auc_per_fold.png", b"png")
    metric = {"mean": 0.5, "std": 0.1}
    put(root / "reports/comparison.json", {
        "n_folds": {"classification": 3, "combined": 3}, "n_test_cells": {"classification": 34, "combined": 34},
        "test": {"classification": {"accuracy": metric}, "combined": {"accuracy": {"mean": 0.6, "std": 0.05}}},
        "validation": {"classification": {"accuracy": metric}, "combined": {"accuracy": metric}},
        "paper": {"combined": {"accuracy": 0.745}},
        "reference": "classification", "part": "validation folds",
        "interval": "Student's t, 95%, with the Nadeau-Bengio correction for 3-fold cross-validation",
        "significance_test": "two-sided Wilcoxon signed-rank (SciPy); null under 5 pairs",
        "paired": {"combined": {
            "accuracy": {"mean_diff": 0.0412, "ci95": [-0.0213, 0.1037], "p_value": 0.0312, "n": 12},
            "mse": {"mean_diff": -0.25, "ci95": [-0.5, 0.0], "p_value": None, "n": 3,
                    "reason": "3 pairs: fewer than 5, no test can reach p < 0.05"},
            "auc_normal": {"mean_diff": 0.01, "ci95": None, "p_value": None, "n": 1}}},
        "paired_test": {"combined": {"accuracy": {"mean_diff": 0.0588, "ci95": [0.0, 0.1176], "p_value": 0.062,
                                                  "n": 34}}},
        "notes": ["combined: 3 pairs: fewer than 5, no test can reach p < 0.05"],
    })
    put(root / "reports/figures/paired/combined_vs_classification.png", b"png")
    put(root / "metrics/ensemble/combined.json", {
        "pipeline": "combined", "served": "ensemble_tta", "n_test_cells": 34, "n_calibration_cells": 17,
        "rows": {
            "single": {"accuracy": {"mean": 0.55, "std": 0.04, "per_fold": [0.51, 0.59]},
                       "ece": {"mean": 0.12, "std": 0.01}, "ece_calibrated": {"mean": 0.06, "std": 0.02},
                       "aurc": {"mean": 0.3, "std": 0.05}, "accuracy_at_coverage": {"0.8": {"mean": 0.6, "std": 0.03},
                                                                               "0.9": {"mean": 0.57, "std": 0.03}},
                       "referral_rate": {"mean": 0.2, "std": 0.0}},
            "ensemble": {"accuracy": 0.6, "ece": 0.1, "ece_calibrated": 0.05, "aurc": 0.25,
                         "accuracy_at_coverage": {"0.8": 0.66, "0.9": 0.63}, "referral_rate": 0.18},
            "ensemble_tta": {"accuracy": 0.62, "ece": 0.09, "ece_calibrated": 0.04, "aurc": 0.22,
                             "accuracy_at_coverage": {"0.8": 0.7, "0.9": 0.65}, "referral_rate": 0.21},
            "final": {"accuracy": 0.58, "ece": 0.11, "ece_calibrated": 0.07, "aurc": 0.27,
                      "accuracy_at_coverage": {"0.8": 0.64, "0.9": 0.6}, "referral_rate": 0.15}}})
    put(root / "models/ensemble/combined.json", {
        "variant": "ensemble_tta", "members": [{"path": "models/combined/fold-0.pt"},
                                               {"path": "models/combined/fold-1.pt"},
                                               {"path": "models/combined/fold-2.pt"}],
        "tta": "dihedral8", "temperature": 1.37, "referral": {"measure": "entropy", "threshold": 1.1,
                                                              "max_rate": 0.2}})
    put(root / "reports/trust/combined/reliability.png", b"png")
    put(root / "reports/trust/combined/risk_coverage.png", b"png")
    put(root / "models/combined/mlflow_runs.json", {
        "pipeline": "combined", "experiment_id": "7", "parent_run_id": "cv-run",
        "folds": {"0": {"run_id": "fold-run-0"}, "1": {"run_id": "fold-run-1"}, "2": {"run_id": "fold-run-2"}},
    })
    put(root / "reports/explain/combined/summary.json",
        {"n_cells": 34, "settings": {"baseline": "white"}, "per_class": {"normal": {"n": 14, "abs_at_n": 0.05}}})
    put(root / "reports/explain/combined/gallery.html", "<html></html>")
    put(root / "metrics/final/combined.json", {"pipeline": "combined", "accuracy": 0.5})
    put(root / "reports/registry.json", [
        {"name": "pap-severity", "version": "2", "promoted": False, "reason": "worse by 0.1 > margin 0",
         "run_id": "register-run", "missing_artifacts": [], "champion_version": "1"},
        {"name": "pap-severity-classification", "version": "1", "promoted": True, "reason": "no champion yet",
         "run_id": "register-run-2", "missing_artifacts": [], "champion_version": "1"},
    ])


def index(root: Path, **kwargs) -> str:
    return write_index(root / "reports", root / "metrics", ("classification", "combined"), models=root / "models",
                       tuning=root / "tuning", **kwargs).read_text()


def test_the_page_shows_each_pipelines_settings(tmp_path):
    minimal_run(tmp_path)
    page = index(tmp_path)
    shared = re.search(r"Shared by every pipeline: <code>([^<]*)</code>", page).group(1)
    assert "arch=resnet18" in shared and "epochs=4" in shared
    assert "lr=" not in shared and "lambda" not in shared  # tuned and differing values are per pipeline
    section = page[page.index("<h2>Settings per pipeline</h2>"):page.index("<h2>Pipeline comparison</h2>")]
    rows = dict(re.findall(r"<tr><th>(classification|combined)</th>((?:<td[^>]*>[^<]*</td>)+)", section))
    assert re.search(r"<th>pipeline</th><th>lr</th><th>weight_decay</th><th>lambda</th><th>tuning</th>", section)
    assert re.findall(r">([^<]*)</td>", rows["classification"])[:3] == ["0.000273", "0.000145", "— (unused)"]
    assert re.findall(r">([^<]*)</td>", rows["combined"])[:3] == ["0.000165", "2.2e-05", "1.37"]
    assert "lambda, lr, weight_decay tuned: best accuracy 0.610 over 3 of 3 trials" in page
    assert f"no tuning record (<code>{tmp_path.as_posix()}/tuning/classification/best_params.json</code>)" in section


def test_the_page_states_what_each_table_averages_and_heads_each_pipelines_figures(tmp_path):
    minimal_run(tmp_path)
    page = index(tmp_path)
    assert "<h3>Held-out test part, mean ± std over the 3 fold models</h3>" in page
    assert "<h2>Pipeline comparison</h2>\n<h3>Held-out test part" in page  # no heading calls the test table CV
    assert "Validation folds (cross-validation), mean ± std over the folds" in page
    assert "0.600 ± 0.050" in page
    for name in ("classification", "combined"):
        heading = page.index(f'<h3 id="pipeline-{name}">{name}</h3>')
        figure = page.index(f'src="figures/{name}/confusion_test.png"')
        assert heading < figure
        assert all(not (heading < page.index(f'<h3 id="pipeline-{other}">') < figure)
                   for other in ("classification", "combined") if other != name)


def test_the_page_states_the_run_date_and_commit(tmp_path):
    minimal_run(tmp_path)
    before = datetime.now(timezone.utc)
    page = index(tmp_path)
    after = datetime.now(timezone.utc)
    written = re.search(r"Page written (\d{4}-\d\d-\d\d \d\d:\d\d) UTC", page).group(1)
    stamp = datetime.strptime(written, "%Y-%m-%d %H:%M").replace(tzinfo=timezone.utc)
    assert before - timedelta(minutes=1) <= stamp <= after
    commit = git_commit()
    assert re.fullmatch(r"[0-9a-f]{40}", commit)  # the tests run in the project's checkout
    assert f"code commit <code>{commit}</code>" in page


def test_the_page_links_the_mlflow_runs_the_model_version_and_the_gallery(tmp_path):
    minimal_run(tmp_path)
    page = index(tmp_path)
    ui = "http://127.0.0.1:5000"
    assert "<code>mlflow ui --backend-store-uri sqlite:///mlflow.db</code>" in page
    assert f'href="{ui}/#/experiments/7/runs/cv-run">cross-validation run</a>' in page
    for k in range(3):
        assert f'href="{ui}/#/experiments/7/runs/fold-run-{k}">{k}</a>' in page
    assert f'href="{ui}/#/runs/tune-run"' in page
    assert f'href="{ui}/#/models/pap-severity/versions/2">v2</a>' in page
    assert f'href="{ui}/#/runs/register-run">register run</a>' in page
    # The gallery is linked from the combined confusion matrix; classification has none and says why.
    combined = page[page.index('<h3 id="pipeline-combined">'):page.index("<h2>Attribution")]
    caption = combined[combined.index('confusion_test.png'):combined.index("</figcaption>")]
    assert '<a href="explain/combined/gallery.html">The misclassified test cells</a>' in caption
    classification = page[page.index('<h3 id="pipeline-classification">'):page.index('<h3 id="pipeline-combined">')]
    assert "gallery.html" not in classification and "No gallery of misclassified cells" in classification
    # Every relative link points at a file of the run.
    for href in set(re.findall(r'(?:href|src)="(?!http|#)([^"]+)"', page)):
        assert (tmp_path / "reports" / href).is_file(), href


def cells(row: str) -> list[str]:
    """The text of each cell of a table row, tags stripped."""
    return [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]


def test_the_page_shows_what_each_served_model_is_worth(tmp_path):
    minimal_run(tmp_path)
    page = index(tmp_path)
    section = page[page.index('<h2 id="trust">'):page.index("<h2>Attribution")]
    assert '<h3 id="trust-combined">combined</h3>' in section
    assert "trust-classification" not in section  # no served model measured for it
    assert "Served: <b>ensemble_tta</b> (3 models, TTA dihedral8, temperature 1.37)" in section
    assert "entropy is above the threshold" in section and "at most 20% of the calibration part" in section
    assert "17 calibration cells" in section and "34 held-out test cells" in section
    rows = {cells(row)[0]: cells(row)[1:] for row in re.findall(r"<tr>(.*?)</tr>", section, re.S)}
    assert rows["candidate"] == ["accuracy", "ECE before", "ECE after", "AURC", "accuracy at 80% coverage",
                                 "referral rate"]
    assert rows["single"] == ["0.550 ± 0.040", "0.120 ± 0.010", "0.060 ± 0.020", "0.300 ± 0.050", "0.600 ± 0.030",
                              "0.200 ± 0.000"]
    assert rows["ensemble_tta (served)"] == ["0.620", "0.090", "0.040", "0.220", "0.700", "0.210"]
    assert list(rows) == ["candidate", "single", "ensemble", "ensemble_tta (served)", "final"]
    for figure in ("trust/combined/reliability.png", "trust/combined/risk_coverage.png"):
        assert f'src="{figure}"' in section


def test_the_page_shows_the_paired_comparison_and_fig_7(tmp_path):
    minimal_run(tmp_path)
    page = index(tmp_path)
    section = page[page.index('<h2 id="paired">'):page.index("<h2>Figures</h2>")]
    assert section.startswith('<h2 id="paired">Paired against classification</h2>')
    assert "Nadeau-Bengio correction for 3-fold" in section and "Wilcoxon signed-rank" in section
    rows = [cells(row) for row in re.findall(r"<tr>(.*?)</tr>", section, re.S)]
    assert rows[0] == ["pipeline", "metric", "mean difference", "95% interval", "p", "pairs"]
    assert rows[1] == ["combined − classification", "accuracy", "+0.041", "[-0.021, +0.104]", "0.0312", "12"]
    assert rows[2] == ["score MSE", "-0.250", "[-0.500, +0.000]", "—", "3"]  # the pipeline cell spans both rows
    assert 'rowspan="2"' in section  # per-class AUCs are in Fig. 7, not the table
    assert ["combined − classification", "+0.059", "[+0.000, +0.118]", "0.062", "34"] in rows
    assert "combined: 3 pairs: fewer than 5, no test can reach p &lt; 0.05" in section
    assert 'src="figures/paired/combined_vs_classification.png"' in section and "Fig. 7" in section


def test_champion_wording_names_one_holder(tmp_path):
    minimal_run(tmp_path)
    page = index(tmp_path, alias="champion")
    rows = dict(re.findall(r"<tr><th>(pap-severity[a-z-]*)</th>(.*?)</tr>", page, re.S))
    assert "held by v1" in rows["pap-severity"] and "this version" not in rows["pap-severity"]
    assert "not promoted (worse by 0.1 &gt; margin 0)" in rows["pap-severity"]
    assert "held by this version" in rows["pap-severity-classification"]
    assert "promoted (no champion yet)" in rows["pap-severity-classification"]
    assert alias_state({"version": "3", "champion_version": "3"}) == "held by this version"
    assert alias_state({"version": "3", "champion_version": "2", "promoted": True}) == "held by v2"
    assert alias_state({"version": "3", "champion_version": None, "promoted": False}) == "held by no version"
    assert alias_state({"version": "3", "promoted": True}) == "held by this version"  # an older record
    assert alias_state({"version": "3", "promoted": False}) == "not held by this version"


def test_values_are_escaped(tmp_path):
    minimal_run(tmp_path)
    registry = json.loads((tmp_path / "reports/registry.json").read_text())
    registry[0]["reason"] = "<script>alert(1)</script>"
    put(tmp_path / "reports/registry.json", registry)
    page = index(tmp_path)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_tracking_server_is_linked_without_its_password(tmp_path):
    assert mlflow_ui("https://user:secret@mlflow.example.org:8443/?x=1") == ("https://mlflow.example.org:8443", None)
    minimal_run(tmp_path)
    page = index(tmp_path, tracking_uri="http://bob:secret@10.0.0.5:5000")
    assert "secret" not in page and "mlflow ui --backend-store-uri" not in page
    assert 'href="http://10.0.0.5:5000/#/models/pap-severity/versions/2"' in page
    _, start = mlflow_ui("postgresql://bob:secret@db/mlflow")
    assert start == "mlflow ui --backend-store-uri postgresql://bob:***@db/mlflow"


def test_a_broken_result_file_is_named(tmp_path):
    minimal_run(tmp_path)
    put(tmp_path / "reports/comparison.json", '{"test": ')
    with pytest.raises(ValueError, match=r"comparison\.json: not valid JSON .*rerun the stage"):
        index(tmp_path)


def test_the_report_stage_uses_the_configs_pipelines_store_and_alias(tmp_path, monkeypatch):
    minimal_run(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config.model_validate({"train": {"pipelines": ["combined"]}, "registry": {"alias": "best"},
                                 "mlflow": {"tracking_uri": "http://127.0.0.1:5999"}})
    out = stages.report(cfg, reports=tmp_path / "reports", metrics=tmp_path / "metrics",
                        models=tmp_path / "models", tuning=tmp_path / "tuning")
    page = out.read_text()
    assert out == tmp_path / "reports" / "index.html"
    assert '<h3 id="pipeline-combined">' in page and '<h3 id="pipeline-classification">' not in page
    assert "<th>@best</th>" in page and 'href="http://127.0.0.1:5999/#/runs/register-run"' in page


@pytest.mark.slow
def test_the_wheel_ships_the_templates(tmp_path):
    """The pages render from an installed wheel (the bento's) only if the templates travel in it."""
    project = tmp_path / "project"  # a clean copy: the build leaves nothing in the checkout
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "--wheel-dir", str(tmp_path / "wheels"), str(project)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "wheels").glob("pap_severity-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    templates = sorted((ROOT / "src/pap_severity/templates").glob("*.j2"))
    assert templates
    for template in templates:
        assert f"pap_severity/templates/{template.name}" in names, template.name
