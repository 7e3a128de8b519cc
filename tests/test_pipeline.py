"""Smoke run of the whole `dvc repro` on a tiny synthetic config, in a scratch copy of the project."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("classification", "regression", "combined", "corn", "sord")

TINY = {
    "synth": {"per_class": 6, "size": 32},
    "split": {"folds": 2},
    "model": {"image_size": 32},
    "train": {"epochs": 1, "batch_size": 16, "threads": 1},
    "tune": {"n_trials": 1, "epochs": 1},
    "explain": {"cells_per_class": 1, "n_steps": 8, "internal_batch_size": 16},
}


def dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True,
                          text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return done


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The project's dvc.yaml, params.yaml (shrunk) and sources in a fresh git + DVC repo, reproduced once."""
    project = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    for folder in ("src", "bento"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info",
                                                                                     "wheels"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc(project, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")  # the project's cache settings
    shutil.copytree(ROOT / ".dvc" / "plots", project / ".dvc" / "plots")  # the templates of dvc.yaml's plots
    dvc(project, "repro")
    return project


@pytest.mark.slow
def test_repro_writes_every_out_and_metric(project):
    expected = [
        "data/manifest.csv",
        "data/splits.csv",
        "reports/validation/validation.json",
        "reports/validation/data_docs/index.html",
        "reports/comparison.md",
        "reports/comparison.json",
        "reports/figures/auc_per_fold.png",
        "reports/explain/combined/report.html",
        "reports/explain/combined/attributions.csv",
        "reports/explain/combined/summary.json",
        "reports/registry.json",
        "reports/bento.json",
        "reports/index.html",
        "mlflow.db",
    ]
    for p in PIPELINES:
        expected += [f"tuning/{p}/best_params.json", f"models/{p}/predictions.csv", f"metrics/{p}.json",
                     f"reports/figures/{p}/confusion_test.png", f"models/final/{p}.pt", f"metrics/final/{p}.json"]
    missing = [path for path in expected if not (project / path).exists()]
    assert not missing, f"dvc repro left out {missing}"
    for p in PIPELINES:
        metrics = json.loads((project / f"metrics/{p}.json").read_text())
        assert metrics["data_source"] == "synthetic"
        for key in ("accuracy", "balanced_accuracy", "mean_auc", "auc_per_class", "mse", "mae", "macro_mae", "qwk",
                    "binary_accuracy", "binary_f1", "sensitivity", "specificity"):
            assert {"mean", "std", "per_fold"} <= set(metrics[key]), key
    assert "synthetic" in (project / "reports/comparison.md").read_text()
    index = (project / "reports/index.html").read_text()
    assert "Data source: <b>synthetic</b>" in index and "not Herlev results" in index
    for linked in ("validation/data_docs/index.html", "explain/combined/report.html", "figures/auc_per_fold.png"):
        assert f'"{linked}"' in index, linked
    registry = {r["name"]: r for r in json.loads((project / "reports/registry.json").read_text())}
    assert registry["pap-severity"]["promoted"] is True
    assert registry["pap-severity"]["missing_artifacts"] == []


@pytest.mark.slow
def test_each_model_is_on_disk_once(project):
    """A fold or final model is the DVC cache's file (a hard link), and MLflow holds no copy of it:
    a fold run names its file (path, md5); only the registered models are MLflow (pt2) models."""
    from pap_severity.tracking import RUNS_FILE, file_md5

    models = sorted((project / "models").glob("*/fold*.pt")) + sorted((project / "models/final").glob("*.pt"))
    assert len(models) == 3 * len(PIPELINES)  # 2 folds and a final model each
    for path in models:
        md5 = file_md5(path)
        cached = project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
        assert path.stat().st_nlink == 2 and path.samefile(cached), path
    for p in PIPELINES:
        runs = json.loads((project / "models" / p / RUNS_FILE).read_text())
        assert {k: f["model"]["path"] for k, f in runs["folds"].items()} == {
            k: f"models/{p}/fold{k}.pt" for k in ("0", "1")}
    weights = [path for path in (project / "mlruns").rglob("*") if path.suffix in (".pt", ".pt2", ".pth", ".ckpt")]
    assert sorted(path.name for path in weights) == ["model.pt2"] * len(PIPELINES), weights  # the registered ones


@pytest.mark.slow
def test_dvc_shows_the_headline_and_the_plots_of_every_pipeline(project):
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)[""]["data"]
    assert list(shown) == ["metrics/headline.json"]  # the one DVC metric
    assert set(shown["metrics/headline.json"]["data"]) == set(PIPELINES)
    plots = json.loads(dvc(project, "plots", "show", "--json").stdout)["data"]
    for name in ("confusion_test", "confusion_val", "scores_test", "auc_per_fold", "reliability", "risk_coverage"):
        points = plots[name][0]["content"]["data"]["values"]
        assert {point["pipeline"] for point in points} == set(PIPELINES), name


@pytest.mark.slow
def test_a_second_repro_changes_nothing(project):
    assert dvc(project, "status").stdout.strip() == "Data and pipelines are up to date."
    done = dvc(project, "repro")
    assert "didn't change, skipping" in done.stdout and "Running stage" not in done.stdout


@pytest.mark.slow
def test_a_param_change_reruns_only_what_depends_on_it(project):
    """explain.n_steps feeds only the explain stage, and through its report the register and report stages."""
    before = json.loads((project / "reports/registry.json").read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["explain"]["n_steps"] = 10
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = dvc(project, "repro")
    ran = {line.split("'")[1] for line in done.stdout.splitlines() if line.startswith("Running stage")}
    assert ran == {"explain@combined", "register", "report"}, done.stdout
    after = json.loads((project / "reports/registry.json").read_text())
    assert after == before, "the same models add no registry version"


@pytest.mark.slow
def test_the_built_bento_serves_the_champion(project):
    """`cd bento && bentoml serve`, with no environment variable, finds the project's BentoML store and
    answers /predict for the champion, with its uncertainty, referral and data source."""
    record = json.loads((project / "reports/bento.json").read_text())
    assert record["bento"].startswith("pap-severity:")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "true"}
    for name in ("BENTOML_HOME", "PAP_SEVERITY_PARAMS"):
        env.pop(name, None)
    log = (project / "serve.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "bentoml"), "serve", "--port", str(port)],
                            cwd=project / "bento", env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 240
            while True:
                assert proc.poll() is None, (project / "serve.log").read_text()[-4000:]
                try:
                    if client.get("/readyz", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, (project / "serve.log").read_text()[-4000:]
                time.sleep(1)
            cell = next((project / "data/synth/severe_dysplastic").glob("*.BMP"))
            buf = io.BytesIO()
            Image.open(cell).save(buf, format="PNG")
            answer = client.post("/predict", files={"image": ("cell.png", buf.getvalue(), "image/png")})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            registry = {r["name"]: r for r in json.loads((project / "reports/registry.json").read_text())}
            assert body["model"]["name"] == "pap-severity"
            assert str(body["model"]["version"]) == str(registry["pap-severity"]["champion_version"])
            assert 1 <= body["severity_score"] <= 5
            assert body["model"]["data_source"] == "synthetic"
            assert set(body["uncertainty"]) >= {"entropy", "score_std"} and isinstance(body["refer"], bool)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def test_records_of_local_side_effects_are_not_versioned():
    """register and bento_build write into the MLflow store and the BentoML store, which git does not carry.

    Were their cache-less outs committed, a fresh clone whose deterministic training reproduces the
    same models would find both stages up to date and end with no registered model and no bento.
    """
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    records = [next(iter(out)) if isinstance(out, dict) else out
               for name in ("register", "bento_build", "report")
               for kind in ("outs", "metrics")
               for out in stages[name].get(kind, [])]
    assert records, "the register, bento_build and report stages declare no outs"
    tracked = subprocess.run(["git", "ls-files", "--", *records], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked == [], f"git tracks {tracked}: untrack them (git rm --cached) and list them in .gitignore"
    ignored = subprocess.run(["git", "check-ignore", *records], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert sorted(ignored) == sorted(records), f"not in .gitignore: {sorted(set(records) - set(ignored))}"
