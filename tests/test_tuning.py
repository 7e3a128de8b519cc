"""Optuna studies on real (tiny) trainings: the search space and its checks, shared PostgreSQL
studies, killed workers, resumed studies that draw what uninterrupted ones draw, clear
storage errors, and the MLflow runs they leave.

Each trial trains resnet18 at 32 px for one epoch on each of 2 folds of ~34 synthetic cells.
"""

from __future__ import annotations

import json
import os
import re
import shutil
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

from pap_severity.config import RUN_PARAMS, Config, ConfigError, TuneConfig, load_config
from pap_severity.tuning.space import (
    BEST_FILE,
    apply_best_params,
    cv_items,
    default_study_name,
    overridden_keys,
    read_best_params,
    search_space,
    trial_config,
    write_best_params,
)
from pap_severity.tuning.storage import STUDY_FILE, storage_url
from pap_severity.tuning.worker import distributions, run_worker, tune

ROOT = Path(__file__).resolve().parents[1]

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}

WORKER = r"""
import json, sys
from pap_severity.config import load_config
from pap_severity.data.manifest import read_manifest
from pap_severity.data.splits import read_splits
from pap_severity.tuning.worker import run_worker
params, manifest, splits, out, storage, track = sys.argv[1:7]
summary = run_worker(load_config(params), "combined", read_manifest(manifest), read_splits(splits), out,
                     storage=storage, progress=True, track=track == "track")
print("SUMMARY " + json.dumps(summary), flush=True)
"""


def tiny_config(tmp: Path, *, killed: bool = False, **tune) -> Config:
    """killed: for the tests that SIGKILL a worker inside a trial. Its trials train the full-width
    resnet18 (seconds each); the default narrow model's end before the kill lands."""
    raw = {
        "model": {"image_size": 32, **({"arch": "resnet18"} if killed else {})},
        "train": {"batch_size": 16, "device": "cpu", "channels_last": False, "amp": False, "patience": 5,
                  "threads": 1},
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


@pytest.fixture
def cells(synth_set) -> dict:
    """The session's synthetic cells, manifest and splits (2 cv folds and a test part)."""
    return synth_set


def write_params(cfg: Config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True)))
    assert load_config(path) == cfg
    return path


def init_mlflow(cfg: Config) -> None:
    """Create the MLflow store and experiment before workers start (no migration race)."""
    from pap_severity.tracking import Tracker

    Tracker(cfg, "synthetic")


def start_worker(tmp: Path, params: Path, cells: dict, storage: str, name: str, track: bool = True,
                 out: Path | None = None) -> subprocess.Popen:
    log = open(tmp / f"{name}.log", "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(params), str(cells["manifest_csv"]), str(cells["splits_csv"]),
         str(out or tmp / "tuning"), storage, "track" if track else "no-track"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
    )


def journal_study(cfg: Config, cells: dict, out: Path, pipeline: str = "combined") -> optuna.Study:
    """The pipeline's study in its default journal file under `out`, read without running trials."""
    name = default_study_name(cfg, pipeline, cv_items(cells["manifest"], cells["splits"]))
    backend = optuna.storages.journal.JournalFileBackend(str(out / pipeline / STUDY_FILE))
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend))


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
    assert set(search_space(cfg, "combined")) == {"train.lr", "train.weight_decay", "loss.lambda"}
    assert set(search_space(cfg, "classification")) == {"train.lr", "train.weight_decay"}
    space = distributions(cfg, "combined")
    assert space["train.lr"].log and not space["loss.lambda"].log
    tuned = apply_best_params(cfg, {"params": {"train.lr": 0.002, "train.weight_decay": 0.003, "loss.lambda": 2.5}})
    assert (tuned.train.lr, tuned.train.weight_decay, tuned.loss.lambda_) == (0.002, 0.003, 2.5)
    assert tuned.train.epochs == cfg.train.epochs and tuned.model == cfg.model
    plain = apply_best_params(cfg, {"train.lr": 0.01, "train.weight_decay": 0.0})
    assert plain.loss.lambda_ == cfg.loss.lambda_ and plain.train.lr == 0.01
    # best_params.json files written before the space was configurable still apply.
    old = apply_best_params(cfg, {"params": {"lr": 0.002, "weight_decay": 0.003, "lambda": 2.5}})
    assert old == tuned


def test_default_space_is_todays_and_valid():
    default = TuneConfig().space
    # The default is not validated when built (it would need RUN_PARAMS, defined after it): check it here.
    assert TuneConfig(space={k: v.model_dump() for k, v in default.items()}).space == default
    assert {k: (v.low, v.high, v.log) for k, v in default.items()} == {
        "train.lr": (1e-4, 3e-3, True), "train.weight_decay": (1e-6, 1e-2, True), "loss.lambda": (0.1, 4.0, False)}
    assert load_config(ROOT / "params.yaml").tune.space == default


def test_a_wider_space_of_ints_floats_and_choices():
    cfg = Config.model_validate({"tune": {"epochs": 2, "space": {
        "train.lr": {"low": 1e-4, "high": 3e-3, "log": True},
        "train.epochs": {"low": 10, "high": 40, "step": 10},
        "model.image_size": {"choices": [64, 96, 128]},
        "augment.hed": {"choices": [0.0, 0.05]},
        "augment.affine_degrees": {"choices": [10, 180]},
        "loss.label_smoothing": {"low": 0, "high": 0.2},
        "augment.mixup": {"low": 0.0, "high": 0.4, "step": 0.1},
    }}})
    space = distributions(cfg, "sord")
    assert isinstance(space["train.epochs"], optuna.distributions.IntDistribution) and space["train.epochs"].step == 10
    assert space["model.image_size"].choices == (64, 96, 128)
    assert space["augment.affine_degrees"].choices == (10.0, 180.0)  # in the setting's type
    assert isinstance(space["loss.label_smoothing"], optuna.distributions.FloatDistribution)
    assert space["augment.mixup"].step == pytest.approx(0.1)
    params = {"train.lr": 0.001, "train.epochs": 30, "model.image_size": 96, "augment.hed": 0.05,
              "augment.affine_degrees": 180.0, "loss.label_smoothing": 0.1, "augment.mixup": 0.2}
    trial = trial_config(cfg, params)
    assert (trial.train.epochs, trial.model.image_size, trial.augment.hed, trial.loss.label_smoothing) == (30, 96, 0.05, 0.1)
    assert trial.train.early_stopping_metric == cfg.tune.metric
    # tune.epochs is the trial length unless train.epochs is searched.
    assert trial_config(Config(), {"train.lr": 0.001}).train.epochs == Config().tune.epochs
    assert overridden_keys(cfg, "sord") == set(params) | {"train.early_stopping_metric"}
    # A tuned value outside what the setting allows is refused like in params.yaml.
    with pytest.raises(ValueError, match="image_size"):
        apply_best_params(cfg, {"model.image_size": 8})
    with pytest.raises(ValueError, match="train.nope"):
        apply_best_params(cfg, {"train.nope": 1})


@pytest.mark.parametrize("entry, message", [
    ({"train.nope": {"low": 1, "high": 2}}, "tune.space.train.nope: no such setting"),
    ({"lr": {"low": 1, "high": 2}}, "tune.space.lr: no such setting"),
    ({"synth.seed": {"low": 1, "high": 2}}, "tune.space.synth.seed: not a setting that defines a training run"),
    ({"train.device": {"choices": ["cpu", "cuda"]}}, "tune.space.train.device: not a setting that defines a training run"),
    ({"train.lr": {"low": 0.01, "high": 0.001}}, r"tune.space.train.lr: low \(0.01\) must be below high"),
    ({"train.lr": {"low": 0.001, "high": 0.001}}, "tune.space.train.lr: low .* must be below high"),
    ({"loss.lambda": {"low": 0.0, "high": 4.0, "log": True}}, "tune.space.loss.lambda: a log range needs low > 0"),
    ({"train.epochs": {"low": 1.5, "high": 4}}, "tune.space.train.epochs: low 1.5 is not a valid train.epochs"),
    ({"model.image_size": {"choices": [64, 8]}}, "tune.space.model.image_size: choice 8 is not a valid"),
    ({"train.scheduler": {"low": 0, "high": 1}}, "tune.space.train.scheduler: .* not a number; give choices"),
    ({"train.early_stopping_metric": {"choices": ["accuracy", "qwk"]}}, "every trial stops on tune.metric"),
    ({}, "tune.space is empty"),
])
def test_a_bad_search_space_fails_at_load_naming_the_key(tmp_path, entry, message):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"tune": {"space": entry}}))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_the_old_range_keys_say_where_they_went(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"tune": {"lr": [0.0001, 0.003]}}))
    with pytest.raises(ConfigError, match="tune.lr is now tune.space: train.lr"):
        load_config(path)


def test_best_params_file_round_trip_and_bad_files(tmp_path):
    best = {"params": {"train.lr": 0.002, "model.arch": "resnet34"}, "value": 0.5}
    path = write_best_params(tmp_path / BEST_FILE, best)
    assert read_best_params(path) == best
    assert apply_best_params(Config(), read_best_params(path)).model.arch == "resnet34"
    (tmp_path / "bad.json").write_text('{"params": {}}')
    with pytest.raises(ValueError, match="not a best_params.json"):
        read_best_params(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="pap-severity tune"):
        read_best_params(tmp_path / "missing.json")


def test_training_stages_read_best_params_without_optuna(tmp_path):
    """space.py is all train, evaluate and train_final need: it must not import Optuna."""
    path = write_best_params(tmp_path / BEST_FILE, {"params": {"train.lr": 0.002, "augment.hed": 0.05}})
    code = ("import sys\n"
            "import pap_severity.tuning, pap_severity.tuning.space\n"
            "from pap_severity import stages\n"
            "from pap_severity.config import Config\n"
            f"cfg = stages.tuned(Config(), __import__('pathlib').Path({str(path)!r}))\n"
            "assert cfg.train.lr == 0.002 and cfg.augment.hed == 0.05\n"
            "assert 'optuna' not in sys.modules, 'optuna imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_settings_state_every_searched_value():
    from pap_severity.stages import settings

    cfg = Config.model_validate({"tune": {"space": {"train.lr": {"low": 1e-4, "high": 1e-2, "log": True},
                                                    "augment.hed": {"choices": [0.0, 0.05]}}}})
    shown = settings(apply_best_params(cfg, {"train.lr": 0.004, "augment.hed": 0.05}))
    assert shown["lr"] == 0.004 and shown["hed"] == 0.05


def test_dvc_tune_stage_lists_what_defines_its_studies():
    """tune's params: tune, and every key of RUN_PARAMS but those all pipelines' trials set."""
    cfg = load_config(ROOT / "params.yaml")
    dumped = cfg.model_dump(mode="json", by_alias=True)

    def leaves(keys):
        return {leaf for k in keys for leaf in ([k] if "." in k else [f"{k}.{n}" for n in dumped[k]])}

    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["tune"]
    listed = set(stage["params"])
    assert {"tune", "train.pipelines"} <= listed  # train.pipelines: which studies the stage runs
    overridden = set.intersection(*(set(overridden_keys(cfg, p)) for p in cfg.train.pipelines))
    assert leaves(listed - {"tune", "train.pipelines"}) == leaves(RUN_PARAMS) - overridden


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
    wider = {**cfg.tune.space, "train.lr": cfg.tune.space["train.lr"].model_copy(update={"low": 1e-5})}
    other = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"space": wider})})
    assert default_study_name(other, "combined", cv) != name
    metric = cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"metric": "qwk"})})
    assert default_study_name(metric, "combined", cv) != name
    fewer = cv.iloc[1:]
    assert default_study_name(cfg, "combined", fewer) != name
    # lambda is tuned for combined: its fixed value is not part of the search; for sord it is.
    lam = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"lambda_": 3.0})})
    assert default_study_name(lam, "combined", cv) == name
    assert default_study_name(lam, "sord", cv) != default_study_name(cfg, "sord", cv)
    # What defines a run defines the study: a setting of config.RUN_PARAMS the study does not set.
    amp = cfg.model_copy(update={"train": cfg.train.model_copy(update={"amp": not cfg.train.amp})})
    assert default_study_name(amp, "combined", cv) != name
    for key, value in (("lr", 0.05), ("epochs", 99), ("early_stopping_metric", "qwk"), ("device", "cpu")):
        changed = cfg.model_copy(update={"train": cfg.train.model_copy(update={key: value})})
        assert default_study_name(changed, "combined", cv) == name, key


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
    # Tuning must never read the test part: a copy of the cells without them.
    root = Path(cells["root"])
    shutil.copytree(root, tmp_path / "cells")
    manifest, splits = cells["manifest"].copy(), cells["splits"].copy()
    for table, columns in ((manifest, ("path", "mask_path")), (splits, ("path",))):
        for column in columns:
            table[column] = table[column].str.replace(str(root), str(tmp_path / "cells"), regex=False)
    test_paths = set(splits.loc[splits["part"] == "test", "path"])
    assert test_paths
    for p in test_paths:
        os.remove(p)
    t0 = time.monotonic()
    best = tune(cfg, "combined", manifest, splits, tmp_path / "tuning", progress=False)
    print(f"2 trials in {time.monotonic() - t0:.1f} s")

    assert (tmp_path / "tuning" / "combined" / STUDY_FILE).is_file()
    saved = read_best_params(tmp_path / "tuning" / "combined" / BEST_FILE)
    assert saved == best
    assert set(best["params"]) == {"train.lr", "train.weight_decay", "loss.lambda"}
    assert best["metric"] == "accuracy" and best["direction"] == "maximize"
    assert best["n_complete"] + best["n_pruned"] + best["n_failed"] == 2 and best["finished"]
    assert best["data_source"] == "synthetic"
    lr = cfg.tune.space["train.lr"]
    assert lr.low <= best["params"]["train.lr"] <= lr.high

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
    study = journal_study(cfg, cells, tmp_path / "tuning")
    assert sorted(r.info.run_name for r in trials) == sorted(f"trial-{t.number}" for t in study.trials)
    for run in trials:
        trial = study.trials[int(run.data.tags["optuna.trial"])]
        assert run.data.tags["state"] == {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}[trial.state.name]
        assert float(run.data.params["train.lr"]) == pytest.approx(trial.params["train.lr"])
        assert float(run.data.params["loss.lambda"]) == pytest.approx(trial.params["loss.lambda"])
        assert run.data.params["tuned"] == "train.lr,train.weight_decay,loss.lambda"
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
    assert len(journal_study(cfg, cells, tmp_path / "tuning").trials) == 2
    # Raising n_trials extends the same study.
    more = tune(cfg, "combined", manifest, splits, tmp_path / "tuning", n_trials=3, progress=False)
    assert more["n_complete"] + more["n_pruned"] + more["n_failed"] == 3
    assert more["study_name"] == best["study_name"]


# Resume after a kill (journal) ---------------------------------------------------------


@pytest.mark.slow
def test_killed_journal_study_resumes_to_the_same_budget(cells, tmp_path):
    cfg = tiny_config(tmp_path, killed=True, n_trials=2)
    params = write_params(cfg, tmp_path / "params.yaml")
    init_mlflow(cfg)
    def loader():
        return journal_study(cfg, cells, tmp_path / "tuning")

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
    cfg = tiny_config(tmp_path, killed=True, n_trials=3)
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
    params = {"train.lr": 1e-3, "train.weight_decay": 1e-4, "loss.lambda": 1.0}
    study.add_trial(optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE, value=1.0, intermediate_values={0: 1.0, 1: 1.0},
        params=params, distributions=distributions(cfg, "combined")))

    best = tune(cfg, "combined", manifest, splits, tmp_path / "tuning", progress=False)
    study = journal_study(cfg, cells, tmp_path / "tuning")
    pruned = study.trials[1]
    assert pruned.state == optuna.trial.TrialState.PRUNED
    assert sorted(pruned.intermediate_values) == [0, 1] and pruned.intermediate_values[1] < 1.0
    assert best["n_pruned"] == 1 and best["best_trial"] == 0 and best["value"] == 1.0
    assert best["params"] == params
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    run = client.get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.data.tags["state"] == "pruned" and run.info.status == "KILLED"
    assert "step 1" in run.data.tags["state_reason"] and "objective" not in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [0, 1]


# A resumed study draws what an uninterrupted one draws --------------------------------------


def finished_trials(study: optuna.Study) -> list[tuple]:
    """(state, params, value) of the trials that count, in order: lost (failed) trials left out."""
    return [(t.state.name, t.params, t.value) for t in sorted(study.trials, key=lambda t: t.number)
            if t.state != optuna.trial.TrialState.FAIL]


@pytest.fixture(scope="module")
def uninterrupted(synth_set, tmp_path_factory) -> dict:
    """A 3-trial study run start to end by one worker process (journal file), no MLflow; the settings
    of the killed study below (killed=True), so that the kill lands inside a trial."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = tiny_config(tmp, killed=True, n_trials=3)
    params = write_params(cfg, tmp / "params.yaml")
    summary = finish(start_worker(tmp, params, synth_set, "", "baseline", track=False), tmp, "baseline")
    study = journal_study(cfg, synth_set, tmp / "tuning")
    return {"cfg": cfg, "summary": summary, "trials": finished_trials(study)}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["journal", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_study_killed_and_resumed_draws_what_an_uninterrupted_one_draws(cells, tmp_path, uninterrupted,
                                                                         backend, request):
    """Kill the worker during trial 1 (SIGKILL), resume: the retry of trial 1 and the trial after it
    have the parameters and values of the uninterrupted study's trials 1 and 2, and the best is the same."""
    cfg = uninterrupted["cfg"]  # the same settings, so the same study name
    params = write_params(cfg, tmp_path / "params.yaml")
    storage = request.getfixturevalue("pg_url") if backend == "postgres" else ""
    worker = start_worker(tmp_path, params, cells, storage, "killed", track=False)
    try:
        killed = wait_for(running_trial(tmp_path / "killed.log", at_least=1), 180, "trial 1", [worker])
        time.sleep(0.5)  # inside the training, not in a storage write
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert killed == 1
    resumed = finish(start_worker(tmp_path, params, cells, storage, "resumed", track=False), tmp_path, "resumed")

    if backend == "postgres":
        study = optuna.load_study(study_name=resumed["study_name"], storage=storage_url(storage))
    else:
        study = journal_study(cfg, cells, tmp_path / "tuning")
    assert study.trials[killed].state == optuna.trial.TrialState.FAIL
    assert [t.system_attrs.get("failed_trial") for t in study.trials] == [None, None, killed, None]
    assert finished_trials(study) == uninterrupted["trials"]
    base = uninterrupted["summary"]
    assert (resumed["params"], resumed["value"]) == (base["params"], base["value"])
    assert resumed["study_name"] == base["study_name"] and resumed["finished"]


# Storage URLs that cannot be used -------------------------------------------------------------


@pytest.mark.parametrize("url, says", [
    ("nosuchdb://postgres:s3cret@127.0.0.1/optuna", "give postgresql://user[:password]@host[:port]/database"),
    ("postgresql://postgres:s3cret@127.0.0.1:1/optuna", "check the host, port, user and password"),
    pytest.param("postgresql://postgres:s3cret@127.0.0.1:5432/pap_no_such_database", "create the database first",
                 marks=pytest.mark.postgres),
])
def test_tune_with_a_bad_storage_url_says_what_to_do(cells, tmp_path, monkeypatch, request, url, says):
    from typer.testing import CliRunner

    from pap_severity.cli import app

    if "5432" in url:
        request.getfixturevalue("pg_url")  # skips when the server is not there
    (tmp_path / "data").mkdir()
    shutil.copy(cells["manifest_csv"], tmp_path / "data" / "manifest.csv")
    shutil.copy(cells["splits_csv"], tmp_path / "data" / "splits.csv")
    params = write_params(tiny_config(tmp_path), tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["tune", "-p", "combined", "--storage", url, "--params", str(params),
                                      "--no-track"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    shown = url.replace("s3cret", "***")
    assert lines[0].startswith(f"error: cannot use the Optuna storage {shown}: ") and says in lines[0], lines[0]
    assert "s3cret" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "tuning").exists()
