"""Optuna studies on real (tiny) trainings: shared PostgreSQL studies, killed workers,
resumed journal studies, and the MLflow runs they leave.

Each trial trains resnet18 at 32 px for one epoch on each of 2 folds of ~28 synthetic cells.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from pap_severity.config import Config, SplitConfig, load_config
from pap_severity.data.manifest import build_manifest, write_manifest
from pap_severity.data.splits import make_splits, write_splits
from pap_severity.data.synth import make_synthetic
from pap_severity.tuning import (
    BEST_FILE,
    STUDY_FILE,
    apply_best_params,
    cv_items,
    default_study_name,
    load_study,
    read_best_params,
    run_worker,
    search_space,
    storage_url,
    tune,
)

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}

WORKER = r"""
import json, sys
from pap_severity.config import load_config
from pap_severity.data.manifest import read_manifest
from pap_severity.data.splits import read_splits
from pap_severity.tuning import run_worker
params, manifest, splits, out, storage = sys.argv[1:6]
summary = run_worker(load_config(params), "combined", read_manifest(manifest), read_splits(splits), out,
                     storage=storage, progress=True)
print("SUMMARY " + json.dumps(summary), flush=True)
"""


def tiny_config(tmp: Path, **tune) -> Config:
    raw = {
        "model": {"image_size": 32},
        "train": {"batch_size": 16, "device": "cpu", "channels_last": False, "amp": False, "patience": 5},
        "split": {"folds": 2, "test_fraction": 0.2},
        "tune": {"n_trials": 3, "epochs": 1, "heartbeat_interval": 1, "grace_period": 3,
                 "pruner_startup_trials": 1, **tune},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "tune-test"},
    }
    return Config.model_validate(raw)


@pytest.fixture(autouse=True)
def mlflow_store(tmp_path, monkeypatch) -> str:
    """Each test's own MLflow store. mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI in
    os.environ (which tracking.tracking_uri prefers), so pin it per test; workers inherit it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="module")
def cells(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("cells")
    make_synthetic(root / "synth", per_class=5, size=32, seed=0, progress=False)
    manifest = build_manifest(root / "synth", progress=False)
    splits = make_splits(manifest, SplitConfig(folds=2, test_fraction=0.2, seed=0))
    return {
        "manifest": manifest,
        "splits": splits,
        "manifest_csv": write_manifest(manifest, root / "manifest.csv"),
        "splits_csv": write_splits(splits, root / "splits.csv"),
    }


def write_params(cfg: Config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True)))
    assert load_config(path) == cfg
    return path


def init_mlflow(cfg: Config) -> None:
    """Create the MLflow store and experiment before workers start (no migration race)."""
    from pap_severity.tracking import Tracker

    Tracker(cfg, "synthetic")


def start_worker(tmp: Path, params: Path, cells: dict, storage: str, name: str) -> subprocess.Popen:
    log = open(tmp / f"{name}.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(params), str(cells["manifest_csv"]), str(cells["splits_csv"]),
         str(tmp / "tuning"), storage],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
    )


def finish(proc: subprocess.Popen, tmp: Path, name: str, timeout: float = 240) -> dict:
    proc.wait(timeout=timeout)
    text = (tmp / f"{name}.log").read_text()
    assert proc.returncode == 0, f"worker {name} failed:\n{text[-4000:]}"
    line = [ln for ln in text.splitlines() if ln.startswith("SUMMARY ")][-1]
    return json.loads(line.removeprefix("SUMMARY "))


def wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            assert p.poll() is None, f"a worker exited early while waiting for {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def running_trial(log: Path, at_least: int = 0):
    """The number of the trial a worker is running now, read from its log (no database reads
    while workers write), once it is >= at_least."""

    def check():
        if not log.is_file():
            return None
        started, ended = set(), set()
        for line in log.read_text().splitlines():
            if m := re.search(r"\] trial (\d+) starts", line):
                started.add(int(m.group(1)))
            elif m := re.search(r"\] trial (\d+) (complete|pruned|failed)", line):
                ended.add(int(m.group(1)))
        running = [n for n in started - ended if n >= at_least]
        return running[0] if running else None

    return check


@pytest.fixture
def pg_url():
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(dbname="postgres", connect_timeout=3, **PG)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {PG['host']}:{PG['port']} ({exc})")
    admin.autocommit = True
    name = f"optuna_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql://{PG['user']}@{PG['host']}:{PG['port']}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def states(study) -> dict[str, int]:
    return pd.Series([t.state.name for t in study.get_trials(deepcopy=False)]).value_counts().to_dict()


# Pure parts ---------------------------------------------------------------------------------


def test_search_space_and_apply_best_params():
    cfg = Config()
    assert set(search_space(cfg, "combined")) == {"lr", "weight_decay", "lambda"}
    assert set(search_space(cfg, "classification")) == {"lr", "weight_decay"}
    assert search_space(cfg, "combined")["lr"].log and not search_space(cfg, "combined")["lambda"].log
    tuned = apply_best_params(cfg, {"params": {"lr": 0.002, "weight_decay": 0.003, "lambda": 2.5}})
    assert (tuned.train.lr, tuned.train.weight_decay, tuned.loss.lambda_) == (0.002, 0.003, 2.5)
    assert tuned.train.epochs == cfg.train.epochs and tuned.model == cfg.model
    plain = apply_best_params(cfg, {"lr": 0.01, "weight_decay": 0.0})
    assert plain.loss.lambda_ == cfg.loss.lambda_ and plain.train.lr == 0.01


def test_study_name_follows_the_search_settings(cells):
    cfg = Config()
    cv = cv_items(cells["manifest"], cells["splits"])
    assert set(cv["part"]) == {"cv"}
    assert not set(cv["path"]) & set(cells["splits"].query("part == 'test'")["path"])
    name = default_study_name(cfg, "combined", cv)
    assert name.startswith("combined-")
    # The budget and the storage do not define the search; the ranges, the metric and the cells do.
    same = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"n_trials": 50, "storage": "x"})})
    assert default_study_name(same, "combined", cv) == name
    other = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"lr": (1e-5, 1e-2)})})
    assert default_study_name(other, "combined", cv) != name
    metric = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"metric": "qwk"})})
    assert default_study_name(metric, "combined", cv) != name
    fewer = cv.iloc[1:]
    assert default_study_name(cfg, "combined", fewer) != name
    # lambda is tuned for combined: its fixed value is not part of the search.
    lam = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"lambda_": 3.0})})
    assert default_study_name(lam, "combined", cv) == name


def test_cv_items_refuses_cells_outside_the_manifest(cells):
    splits = cells["splits"].copy()
    splits.loc[0, "path"] = "/nowhere.bmp"
    with pytest.raises(ValueError, match="not in the manifest"):
        cv_items(cells["manifest"], splits)


# In-process study: MLflow runs, test part untouched ---------------------------------------


@pytest.mark.slow
def test_study_logs_parent_and_trial_runs_without_the_test_part(cells, tmp_path):
    import mlflow

    cfg = tiny_config(tmp_path, n_trials=2)
    # Tuning must never read the test part: remove those cells from disk.
    manifest = cells["manifest"]
    splits = cells["splits"]
    test_paths = set(splits.loc[splits["part"] == "test", "path"])
    assert test_paths
    backup = tmp_path / "held-out"
    backup.mkdir()
    moved = []
    try:
        for i, p in enumerate(sorted(test_paths)):
            target = backup / f"{i}.bmp"
            os.replace(p, target)
            moved.append((p, target))
        t0 = time.monotonic()
        best = tune(cfg, "combined", manifest, splits, tmp_path / "tuning", progress=False)
        elapsed = time.monotonic() - t0
    finally:
        for p, target in moved:
            os.replace(target, p)
    print(f"2 trials in {elapsed:.1f} s")

    assert (tmp_path / "tuning" / "combined" / STUDY_FILE).is_file()
    saved = read_best_params(tmp_path / "tuning" / "combined" / BEST_FILE)
    assert saved == best
    assert set(best["params"]) == {"lr", "weight_decay", "lambda"}
    assert best["metric"] == "accuracy" and best["direction"] == "maximize"
    assert best["n_complete"] + best["n_pruned"] + best["n_failed"] == 2 and best["finished"]
    assert best["data_source"] == "synthetic"
    lo, hi = cfg.tune.lr
    assert lo <= best["params"]["lr"] <= hi

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name == "tune-combined"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == best["mlflow_run_id"]
    assert parent.data.metrics["best_value"] == pytest.approx(best["value"])
    assert parent.data.params["tune.metric"] == "accuracy"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    study = load_study(cfg, "combined", manifest, splits, tmp_path / "tuning")
    assert sorted(r.info.run_name for r in trials) == sorted(f"trial-{t.number}" for t in study.trials)
    for run in trials:
        trial = study.trials[int(run.data.tags["optuna.trial"])]
        assert run.data.tags["state"] == {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}[trial.state.name]
        assert float(run.data.params["lr"]) == pytest.approx(trial.params["lr"])
        assert float(run.data.params["lambda"]) == pytest.approx(trial.params["lambda"])
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert {m.step: m.value for m in history} == pytest.approx(trial.intermediate_values)
        if trial.state.name == "COMPLETE":
            assert run.data.metrics["objective"] == pytest.approx(trial.value)
            assert run.info.status == "FINISHED"
            # The objective is the mean of the folds' best validation accuracy.
            folds = [run.data.metrics[f"fold{k}_best_accuracy"] for k in (0, 1)]
            assert trial.value == pytest.approx(sum(folds) / 2)
            # Global steps from 0: fold 0 epoch 1 is step 0, fold 1 epoch 1 is step 1.
            assert sorted(trial.intermediate_values) == [0, 1]

    # Run again: the budget is spent, nothing new runs, the same best comes back.
    again = tune(cfg, "combined", manifest, splits, tmp_path / "tuning", progress=False)
    assert again == best
    assert len(load_study(cfg, "combined", manifest, splits, tmp_path / "tuning").trials) == 2
    # Raising n_trials extends the same study.
    more = tune(cfg, "combined", manifest, splits, tmp_path / "tuning", n_trials=3, progress=False)
    assert more["n_complete"] + more["n_pruned"] + more["n_failed"] == 3
    assert more["study_name"] == best["study_name"]


# Resume after a kill (journal) ---------------------------------------------------------


@pytest.mark.slow
def test_killed_journal_study_resumes_to_the_same_budget(cells, tmp_path):
    cfg = tiny_config(tmp_path, n_trials=2)
    params = write_params(cfg, tmp_path / "params.yaml")
    init_mlflow(cfg)
    def loader():
        return load_study(cfg, "combined", cells["manifest"], cells["splits"], tmp_path / "tuning")

    worker = start_worker(tmp_path, params, cells, "", "journal")
    try:
        # Killed in its second trial, the first one complete.
        killed = wait_for(running_trial(tmp_path / "journal.log", at_least=1), 180, "the second trial", [worker])
        time.sleep(0.5)  # inside the training, not in a journal write
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert loader().trials[killed].state == optuna.trial.TrialState.RUNNING

    best = tune(cfg, "combined", cells["manifest"], cells["splits"], tmp_path / "tuning", progress=False)
    study = loader()
    lost = study.trials[killed]
    assert lost.state == optuna.trial.TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].params == lost.params
    assert retries[0].state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    finished = [t for t in study.trials if t.state.is_finished() and t.number != killed]
    assert len(finished) == 2 and best["finished"]
    assert len(study.trials) == 3  # the 2 of the budget and the lost one
    # The lost trial's MLflow run is closed as failed.
    import mlflow

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(lost.user_attrs["mlflow_run_id"])
    assert run.data.tags["state"] == "failed" and run.info.status == "FAILED"
    assert "gone" in run.data.tags["state_reason"]


# Two workers on PostgreSQL ---------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.slow
def test_two_worker_processes_share_one_postgres_study(cells, tmp_path, pg_url):
    cfg = tiny_config(tmp_path, n_trials=4)
    params = write_params(cfg, tmp_path / "params.yaml")
    init_mlflow(cfg)
    t0 = time.monotonic()
    workers = [start_worker(tmp_path, params, cells, pg_url, f"w{i}") for i in range(2)]
    try:
        summaries = [finish(w, tmp_path, f"w{i}") for i, w in enumerate(workers)]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    print(f"4 trials, 2 workers: {time.monotonic() - t0:.1f} s")

    study = optuna.load_study(study_name=summaries[0]["study_name"], storage=storage_url(pg_url))
    trials = study.trials
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(trials))) and len(set(numbers)) == len(numbers)
    assert len(trials) == 4, states(study)
    assert all(t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL for t in trials), states(study)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == len(complete)
    # Each worker ran trials, and together exactly the study's trials, each once.
    ran = [set(s["trials_run"]) for s in summaries]
    assert all(ran), f"one worker ran no trial: {ran}"
    assert ran[0].isdisjoint(ran[1]) and ran[0] | ran[1] == set(numbers)
    pids = {t.user_attrs["worker"]["pid"] for t in trials}
    assert pids == {w.pid for w in workers}
    for s in summaries:
        assert s["finished"] and s["n_complete"] + s["n_pruned"] == 4
        assert s["mlflow_run_id"] == summaries[0]["mlflow_run_id"]  # one parent run for both

    import mlflow

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    parent = summaries[0]["mlflow_run_id"]
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_name for r in children) == sorted(f"trial-{n}" for n in numbers)
    assert len(client.search_runs([exp.experiment_id], "attributes.run_name = 'tune-combined'")) == 1


@pytest.mark.postgres
@pytest.mark.slow
def test_a_killed_worker_leaves_the_postgres_study_usable(cells, tmp_path, pg_url):
    cfg = tiny_config(tmp_path, n_trials=3)
    params = write_params(cfg, tmp_path / "params.yaml")
    init_mlflow(cfg)
    victim = start_worker(tmp_path, params, cells, pg_url, "victim")
    survivor = start_worker(tmp_path, params, cells, pg_url, "survivor")
    name = default_study_name(cfg, "combined", cv_items(cells["manifest"], cells["splits"]))

    def loader():
        return optuna.load_study(study_name=name, storage=storage_url(pg_url))

    try:
        killed = wait_for(running_trial(tmp_path / "victim.log"), 180, "a trial of the victim", [victim])
        time.sleep(0.5)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
        summary = finish(survivor, tmp_path, "survivor")
    finally:
        for w in (victim, survivor):
            if w.poll() is None:
                w.kill()

    study = loader()
    lost = study.trials[killed]
    assert lost.state == optuna.trial.TrialState.FAIL, states(study)
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].params == lost.params
    assert retries[0].user_attrs["worker"]["pid"] == survivor.pid
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) == 3 and summary["finished"], states(study)
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING))
    # The study stays usable: another worker finds the budget spent and returns at once.
    again = run_worker(cfg, "combined", cells["manifest"], cells["splits"], tmp_path / "tuning",
                       storage=pg_url, progress=False)
    assert again["trials_run"] == [] and again["finished"]


@pytest.mark.slow
def test_median_pruner_stops_a_trial_below_the_median(cells, tmp_path):
    """A study seeded with a finished trial that had accuracy 1.0 at every step: the next
    trial reports less at step 1 (fold 1, epoch 1; step 0 is warm-up) and is pruned."""
    import mlflow

    cfg = tiny_config(tmp_path, n_trials=2, pruner_startup_trials=1, pruner_warmup_steps=1)
    manifest, splits = cells["manifest"], cells["splits"]
    name = default_study_name(cfg, "combined", cv_items(manifest, splits))
    journal = tmp_path / "tuning" / "combined" / STUDY_FILE
    journal.parent.mkdir(parents=True)
    study = optuna.create_study(study_name=name, direction="maximize", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    space = search_space(cfg, "combined")
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, value=1.0, intermediate_values={0: 1.0, 1: 1.0},
        params={"lr": 1e-3, "weight_decay": 1e-4, "lambda": 1.0}, distributions=space))

    best = tune(cfg, "combined", manifest, splits, tmp_path / "tuning", progress=False)
    study = load_study(cfg, "combined", manifest, splits, tmp_path / "tuning")
    pruned = study.trials[1]
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert sorted(pruned.intermediate_values) == [0, 1] and pruned.intermediate_values[1] < 1.0
    assert best["n_pruned"] == 1 and best["best_trial"] == 0 and best["value"] == 1.0
    assert best["params"] == {"lr": 1e-3, "weight_decay": 1e-4, "lambda": 1.0}
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.data.tags["state"] == "pruned" and run.info.status == "KILLED"
    assert "step 1" in run.data.tags["state_reason"] and "objective" not in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [0, 1]
