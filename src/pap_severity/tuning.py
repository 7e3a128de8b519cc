"""Optuna studies: one per pipeline, shared by any number of workers, mirrored in MLflow.

What is tuned
-------------
The learning rate and the weight decay (both log-uniform over `tune.lr` and
`tune.weight_decay`) and, for the pipelines whose loss has a weight
(`Pipeline.uses_lambda`: combined), the loss weight lambda (uniform over
`tune.lambda`). A trial trains one model per cv fold for `tune.epochs` epochs (early
stopping watches `tune.metric`), with the rest of the settings from params.yaml.

The objective is one scalar: **the mean over the cv folds of the validation
`tune.metric` at each fold's best epoch**, maximised (minimised for mse, mae and
macro_mae). A fold whose metric is undefined (NaN) makes the trial fail. Only the
`part == cv` rows of the splits are read: the held-out test part never reaches tuning.

Sampler and pruner: a TPE sampler (multivariate, constant liar for parallel workers)
seeded from `tune.seed` and the trial number, so trial k draws the same parameters
given the same history whichever worker runs it, and parallel workers do not repeat
each other's draws; its first half of the budget (at most 10 trials) is random exploration. A median
pruner (`tune.pruner_startup_trials`, `tune.pruner_warmup_steps`) sees every epoch's
validation value at step = fold index * tune.epochs + epoch - 1 (from 0), a step that
means the same in every trial; steps below `tune.pruner_warmup_steps` are never judged.

Budget: `tune.n_trials` is the budget of the whole study, split between all workers:
a worker starts a trial only while fewer than n_trials trials are finished or running
(decided under a lock: an advisory lock in PostgreSQL, a file lock for a journal or
SQLite file), so the study ends with exactly n_trials finished trials (complete, pruned
or failed by the objective), plus the failed trials of killed workers, each re-queued
once with the same parameters. A worker that finds the budget taken waits for the
running trials, then returns. `tune.timeout` (seconds, optional) stops a worker from
starting new trials after that long (per worker run, as in Optuna's optimize).

Storage, resume, lost workers
-----------------------------
- Default: a journal file, `tuning/<pipeline>/study.journal` (Optuna's JournalStorage
  with a JournalFileBackend: safe for several processes on one machine, unlike SQLite).
  Run the same command again after a kill, and the study continues to the same
  n_trials. A journal has no heartbeat, so every trial records its worker (machine id,
  pid, process start time) in its user attrs; a worker that starts, or looks for work,
  fails the running trials whose process is gone from this machine and queues their
  parameters again (Optuna's RetryHeartbeatStaleTrialCallback, one retry).
- `tune.storage` / `storage=`: an Optuna RDB URL, `postgresql://user@host/db`, shared by
  workers on many machines. Every running trial sends a heartbeat each
  `tune.heartbeat_interval` seconds; a trial silent for `tune.grace_period` seconds
  (a worker killed, a machine lost) is failed by the next worker that looks for work,
  and its parameters are queued again (same callback). Same-machine pid checks apply too.
- The study is named `<pipeline>-<hash>`, the hash covering what defines the search
  (ranges, metric, epochs, seed, pruner, model/augment/loss/train settings, the cv cells'
  content and folds), so changing any of them starts a new study instead of silently
  continuing a stale one; n_trials, timeout and storage are not in it (raise n_trials to
  extend a finished study).

MLflow
------
One parent run per study, `tune-<pipeline>`, created by the first worker (its id is a
study user attr, `mlflow_parent_run_id`, so every worker and every resume logs under the
same parent; share one tracking server between machines through MLFLOW_TRACKING_URI).
One nested run per trial, `trial-<number>`: the sampled parameters (`lr`,
`weight_decay`, `lambda`) and the trial's full settings as params; every epoch's
`val_<metric>` and `val_loss` at the global step; the objective (`objective`, and
`fold<k>_best_<metric>`); and the tag `state` = complete | pruned | failed (run status
FINISHED, KILLED, FAILED). The parent gets the best value and parameters and the
trial counts when the budget is spent. Logging uses MlflowClient with explicit run ids
(Optuna's MLflowCallback is deprecated in Optuna 5).

Output: `tuning/<pipeline>/best_params.json` (see `BEST_FILE`): the best trial's lr,
weight_decay (and lambda), its value, the metric and direction, the trial counts, the
study name and the data source. The final training applies it with
`apply_best_params(cfg, read_best_params(path))`.

Distributed tuning on PostgreSQL (README)
-----------------------------------------
Any number of workers, on any machines that reach the database and hold the same
cells (same content: paths may differ) and params.yaml::

    createdb -h DBHOST -U postgres optuna            # once
    export MLFLOW_TRACKING_URI=http://MLFLOWHOST:5000 # one MLflow for all workers
    # on each machine, as many workers as it has GPUs (or cores):
    pap-severity tune --pipeline combined \\
        --storage postgresql://postgres@DBHOST:5432/optuna &

Each worker takes trials until the study has `tune.n_trials` finished ones, then waits
for the others' running trials and writes `tuning/combined/best_params.json`. Kill any
worker at any time: its trial is failed after `tune.grace_period` seconds (at once for
a worker on the same machine) and re-run by another worker; start a new worker to add
capacity. `dvc repro` with `-S tune.storage=postgresql://...` joins the same study.

Storage URLs: SQLAlchemy 2.1 reads a bare `postgresql://` as the psycopg 3 driver, which
is not installed; pap-severity rewrites it to `postgresql+psycopg2://` (psycopg2-binary is
a dependency). Tools that take the URL directly (optuna-dashboard, `optuna` CLI) need
the `postgresql+psycopg2://` form spelled out.

Watch a study with optuna-dashboard (an optional extra, not installed by default)::

    pip install optuna-dashboard            # or: pip install -e '.[dashboard]'
    optuna-dashboard postgresql+psycopg2://postgres@DBHOST:5432/optuna
    optuna-dashboard tuning/combined/study.journal   # a journal file: give its path
    # then open http://127.0.0.1:8080: history, intermediate values (the global epoch
    # steps), parameter importances; studies are named <pipeline>-<hash>, and each trial's
    # user attrs name its worker and its MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import FloatDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState

from pap_severity.config import Config
from pap_severity.files import write_json
from pap_severity.pipelines import get_pipeline
from pap_severity.evaluation import LOWER_IS_BETTER, STOPPING_METRICS
from pap_severity.training import split_items, train_fold

log = logging.getLogger(__name__)

STUDY_FILE = "study.journal"
BEST_FILE = "best_params.json"
# A trial lost with its worker is queued again this many times, then stays failed.
MAX_RETRY = 1
# Seconds between looks at the study while other workers' trials are running.
POLL_SECONDS = 1.0
OBJECTIVE = "mean over the cv folds of the validation {metric} at each fold's best epoch"
WORKER_ATTR = "worker"
RUN_ATTR = "mlflow_run_id"
PARENT_ATTR = "mlflow_parent_run_id"


# The search ------------------------------------------------------------------------------


def direction_of(metric: str) -> str:
    return "minimize" if metric in LOWER_IS_BETTER else "maximize"


def search_space(cfg: Config, pipeline: str) -> dict[str, FloatDistribution]:
    """The Optuna distributions of a pipeline's study (lambda only where the loss has it)."""
    t = cfg.tune
    space = {
        "lr": FloatDistribution(*t.lr, log=True),
        "weight_decay": FloatDistribution(*t.weight_decay, log=True),
    }
    if get_pipeline(pipeline).uses_lambda:
        space["lambda"] = FloatDistribution(*t.lambda_)
    return space


def apply_best_params(cfg: Config, best: dict) -> Config:
    """cfg with the tuned lr, weight_decay (and lambda) of `best`: the content of
    best_params.json, or its `params` alone."""
    params = best.get("params", best)
    train = {k: float(params[k]) for k in ("lr", "weight_decay") if k in params}
    update: dict[str, Any] = {"train": cfg.train.model_copy(update=train)}
    if "lambda" in params:
        update["loss"] = cfg.loss.model_copy(update={"lambda_": float(params["lambda"])})
    return cfg.model_copy(update=update)


def trial_config(cfg: Config, params: dict) -> Config:
    """The settings one trial trains with: the sampled parameters, tune.epochs, and early
    stopping on tune.metric (so each fold's best epoch is the best by the tuned metric)."""
    tuned = apply_best_params(cfg, params)
    train = tuned.train.model_copy(update={"epochs": cfg.tune.epochs, "early_stopping_metric": cfg.tune.metric})
    return tuned.model_copy(update={"train": train})


def cv_items(manifest: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    """The cv rows of the splits (path, sha256, severity, part, fold): all tuning ever reads.
    Asserts that no test cell is among them."""
    parts = split_items(manifest, splits)
    cv, test = parts["cv"], parts["test"]
    assert set(cv["path"]).isdisjoint(test["path"]), "a test cell is in the cv part"
    folds = sorted(cv["fold"].unique())
    if len(folds) < 2 or folds[0] < 0:
        raise ValueError(f"tuning needs at least 2 cv folds numbered from 0, the splits hold {folds}")
    return cv


def study_settings(cfg: Config, pipeline: str, cv: pd.DataFrame) -> dict:
    """What defines a study's search (its name hashes this); not n_trials, timeout, storage."""
    uses_lambda = get_pipeline(pipeline).uses_lambda
    t = cfg.tune
    loss = cfg.loss.model_dump(mode="json", by_alias=True)
    if uses_lambda:
        loss.pop("lambda")
    key = "sha256" if "sha256" in cv.columns else "path"
    cells = sorted(f"{c}|{s}|{f}" for c, s, f in zip(cv[key].astype(str), cv["severity"], cv["fold"]))
    return {
        "pipeline": pipeline,
        "metric": t.metric,
        "epochs": t.epochs,
        "space": {name: [d.low, d.high, d.log] for name, d in search_space(cfg, pipeline).items()},
        "seed": t.seed,
        "pruner": [t.pruner_startup_trials, t.pruner_warmup_steps],
        "model": cfg.model.model_dump(mode="json"),
        "augment": cfg.augment.model_dump(mode="json"),
        "loss": loss,
        "train": cfg.train.model_dump(
            mode="json",
            exclude={"pipelines", "workers", "device", "epochs", "lr", "weight_decay", "early_stopping_metric"},
        ),
        "cells": hashlib.sha256("\n".join(cells).encode()).hexdigest(),
    }


def default_study_name(cfg: Config, pipeline: str, cv: pd.DataFrame) -> str:
    text = json.dumps(study_settings(cfg, pipeline, cv), sort_keys=True, separators=(",", ":"))
    return f"{pipeline}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


class TrialSeededTPE(BaseSampler):
    """TPE seeded per trial from (seed, trial number): a fresh TPESampler for each trial
    reads the shared history from the storage, so the draws depend on the seed, the trial
    number and the history, never on which worker runs the trial."""

    def __init__(self, seed: int, n_startup_trials: int) -> None:
        self.seed = seed
        self.n_startup_trials = n_startup_trials
        self._current: tuple[int, TPESampler] | None = None

    def _tpe(self, trial: FrozenTrial) -> TPESampler:
        if self._current is None or self._current[0] != trial.number:
            seed = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
            self._current = (trial.number, TPESampler(seed=seed, n_startup_trials=self.n_startup_trials,
                                                      multivariate=True, constant_liar=True))
        return self._current[1]

    def before_trial(self, study, trial):
        self._tpe(trial).before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self._tpe(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:  # the seed is per trial already
        pass


# Storage, lock, lost workers ---------------------------------------------------------------


def _machine_id() -> str:
    """Where a pid means one process: host name, boot id and pid namespace (two containers
    may share a host name and a kernel, never a pid namespace)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = "noboot"
    try:
        pidns = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        pidns = "nons"
    return f"{socket.gethostname()}/{boot}/{pidns}"


MACHINE = _machine_id()


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks) of a process from /proc, None when absent."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], fields[19]


def this_worker() -> dict:
    pid = os.getpid()
    stat = _proc_stat(pid)
    return {"machine": MACHINE, "pid": pid, "start": stat[1] if stat else None}


def worker_alive(worker: dict) -> bool | None:
    """Whether the process that ran a trial lives; None when it ran on another machine."""
    if worker.get("machine") != MACHINE:
        return None
    pid = int(worker["pid"])
    if Path("/proc/self/stat").exists():
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return False
        return worker.get("start") in (None, stat[1])  # another start time: the pid was reused
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class _FileLock:
    """An exclusive flock on a file next to the storage (one machine)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        pass


class _PgLock:
    """A PostgreSQL session advisory lock keyed by the study name (released if the worker dies)."""

    def __init__(self, url: str, name: str) -> None:
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        self._text = sqlalchemy.text
        self.engine = sqlalchemy.create_engine(url, poolclass=NullPool)
        self.key = int.from_bytes(hashlib.sha256(f"pap-severity/{name}".encode()).digest()[:8], "big", signed=True)
        self._conn = None

    def __enter__(self):
        if self._conn is None:
            self._conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self._conn.execute(self._text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        return self

    def __exit__(self, *exc) -> None:
        if self._conn is not None:
            self._conn.execute(self._text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.engine.dispose()


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def close(self) -> None:
        pass


def redact(storage: str) -> str:
    """A storage URL without its password (for logs, MLflow and best_params.json)."""
    if "://" not in storage:
        return storage
    from sqlalchemy.engine import make_url

    return make_url(storage).render_as_string(hide_password=True)


def storage_url(url: str) -> str:
    """An RDB URL with a driver SQLAlchemy can load: SQLAlchemy 2.1 reads a bare
    `postgresql://` as psycopg 3, while this project installs psycopg2 (psycopg2-binary)."""
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            import importlib.util

            if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
                return "postgresql+psycopg2://" + url[len(bare):]
            return "postgresql://" + url[len(bare):]
    return url


def _open_storage(storage: str, default_journal: Path, cfg: Config, study_name: str, on_stale):
    """(Optuna storage, budget lock, the RDBStorage for heartbeats or None)."""
    if "://" in storage:
        storage = storage_url(storage)
        if storage.startswith("postgresql"):
            lock = _PgLock(storage, study_name)
        elif storage.startswith("sqlite:///"):
            lock = _FileLock(Path(storage.removeprefix("sqlite:///").split("?", 1)[0] + ".budget.lock"))
        else:  # no portable lock: the budget may overshoot by (workers - 1) trials
            log.warning("no budget lock for %s: the study may run up to one extra trial per worker", redact(storage))
            lock = _NoLock()
        # Under a lock for every study of the database: workers started together on an empty
        # database would race to create Optuna's tables (a unique violation in PostgreSQL).
        tables = _PgLock(storage, "optuna-tables") if storage.startswith("postgresql") else lock
        with tables, warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            rdb = optuna.storages.RDBStorage(
                storage,
                engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=cfg.tune.heartbeat_interval,
                grace_period=cfg.tune.grace_period,
                heartbeat_stale_trial_callback=on_stale,
            )
        if tables is not lock:
            tables.close()
        return rdb, lock, rdb
    path = Path(storage) if storage else default_journal
    path.parent.mkdir(parents=True, exist_ok=True)
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    # Not `<journal>.lock`: JournalFileBackend's own lock file has that name.
    return journal, _FileLock(path.with_name(path.name + ".budget.lock")), None


@contextmanager
def _heartbeat(rdb, study_name: str, number: int, interval: int) -> Iterator[None]:
    """Record the running trial's heartbeat in an RDB storage every `interval` seconds."""
    if rdb is None:
        yield
        return
    trial_id = rdb.get_trial_id_from_study_id_trial_number(rdb.get_study_id_from_name(study_name), number)
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                rdb.record_heartbeat(trial_id)
            except Exception as exc:  # a database hiccup: try again at the next beat
                log.warning("heartbeat of trial %d failed: %s", number, exc)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# MLflow -----------------------------------------------------------------------------------


class _Runs:
    """The study's MLflow parent run and one nested run per trial, by explicit run ids."""

    def __init__(self, cfg: Config, pipeline: str, data_source: str, enabled: bool) -> None:
        self.enabled = enabled
        self.pipeline = pipeline
        self.cfg = cfg
        self.parent_id: str | None = None
        if not enabled:
            return
        from pap_severity.tracking import Tracker

        self.tracker = Tracker(cfg, data_source)
        self.client = self.tracker.client
        self.tags = {**self.tracker.tags, "pipeline": pipeline}

    def open_parent(self, study: optuna.Study, storage: str, settings: dict, done: bool) -> str | None:
        """The parent run named in the study's user attrs, or a new one (call under the lock)."""
        if not self.enabled:
            return None
        from mlflow.exceptions import MlflowException

        known = study.user_attrs.get(PARENT_ATTR)
        if known:
            try:
                self.client.get_run(known)
                self.parent_id = known
            except MlflowException:
                log.warning("the study's MLflow parent run %s is not in %s; logging under a new one",
                            known, self.tracker.uri)
        if self.parent_id is None:
            run = self.client.create_run(
                self.tracker.experiment_id, run_name=f"tune-{self.pipeline}",
                tags={**self.tags, "optuna.study": study.study_name, "optuna.storage": redact(storage)},
            )
            self.parent_id = run.info.run_id
            space = settings["space"]
            params = {
                "pipeline": self.pipeline,
                "study_name": study.study_name,
                "objective": OBJECTIVE.format(metric=settings["metric"]),
                "tune.metric": settings["metric"],
                "direction": direction_of(settings["metric"]),
                "tune.epochs": settings["epochs"],
                "tune.seed": settings["seed"],
                "sampler": "TPESampler(multivariate, constant_liar, seed per trial)",
                "pruner": f"MedianPruner(n_startup_trials={settings['pruner'][0]}, n_warmup_steps={settings['pruner'][1]})",
                **{f"space.{k}": f"[{v[0]}, {v[1]}]{' log' if v[2] else ''}" for k, v in space.items()},
            }
            self._log_params(self.parent_id, params)
            if not known:
                study.set_user_attr(PARENT_ATTR, self.parent_id)
                study.set_user_attr("mlflow_experiment_id", self.tracker.experiment_id)
        if not done:
            self.client.update_run(self.parent_id, status="RUNNING")
        return self.parent_id

    def _log_params(self, run_id: str, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100])

    def start_trial(self, trial: optuna.Trial, params: dict, tcfg: Config, retry_of: int | None) -> str | None:
        if not self.enabled:
            return None
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        from pap_severity.tracking import flatten_params

        tags = {**self.tags, MLFLOW_PARENT_RUN_ID: self.parent_id, "optuna.study": trial.study.study_name,
                "optuna.trial": str(trial.number), "state": "running"}
        if retry_of is not None:
            tags["optuna.retry_of"] = str(retry_of)
        run = self.client.create_run(self.tracker.experiment_id, run_name=f"trial-{trial.number}", tags=tags)
        run_id = run.info.run_id
        self._log_params(run_id, {**params, "trial": trial.number, **flatten_params(tcfg, self.pipeline)})
        return run_id

    def epoch(self, run_id: str | None, step: int, fold: int, metrics: dict) -> None:
        if not self.enabled or run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {f"val_{self.cfg.tune.metric}": metrics.get(self.cfg.tune.metric), "val_loss": metrics.get("loss"),
                  "fold": fold}
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
        self.client.log_batch(run_id, metrics=batch)

    def end_trial(self, run_id: str | None, state: str, value: float | None = None,
                  fold_values: dict | None = None, reason: str = "") -> None:
        if not self.enabled or run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"fold{k}_best_{self.cfg.tune.metric}", float(v), now, 0)
                   for k, v in (fold_values or {}).items()]
        if value is not None:
            metrics.append(Metric("objective", float(value), now, 0))
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        self.client.set_tag(run_id, "state", state)
        if reason:
            self.client.set_tag(run_id, "state_reason", reason[:5000])
        status = {"complete": "FINISHED", "pruned": "KILLED"}.get(state, "FAILED")
        self.client.set_terminated(run_id, status=status)

    def finish(self, summary: dict) -> None:
        if not self.enabled or self.parent_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {"n_complete": summary["n_complete"], "n_pruned": summary["n_pruned"],
                  "n_failed": summary["n_failed"]}
        if summary.get("value") is not None:
            values["best_value"] = summary["value"]
            values.update({f"best_{k}": v for k, v in summary["params"].items()})
        run = self.client.get_run(self.parent_id)
        if run.info.status == "FINISHED" and all(run.data.metrics.get(k) == float(v) for k, v in values.items()):
            return  # logged by another worker, or by an earlier run of a finished study
        self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
        self.client.set_tag(self.parent_id, "n_trials", str(summary["n_trials"]))
        if summary.get("best_trial") is not None:
            self.client.set_tag(self.parent_id, "best_trial", str(summary["best_trial"]))
        self.client.set_terminated(self.parent_id, status="FINISHED" if summary["finished"] else "KILLED")


# The worker -------------------------------------------------------------------------------


@dataclass
class _Context:
    cfg: Config
    pipeline: str
    cv: pd.DataFrame
    study: optuna.Study
    storage_url: str
    lock: Any
    rdb: Any
    runs: _Runs
    budget: int
    progress: bool


def _say(ctx: _Context, message: str) -> None:
    log.info(message)
    if ctx.progress:
        print(f"[tune {ctx.pipeline}] {message}", file=sys.stderr, flush=True)


def _lost(ctx: _Context, frozen: FrozenTrial, reason: str) -> None:
    """A trial whose worker is gone: fail its MLflow run, queue its parameters again."""
    try:
        ctx.runs.end_trial(frozen.user_attrs.get(RUN_ATTR), "failed", reason=reason)
    except Exception as exc:  # MLflow unreachable: the study matters more
        log.warning("could not mark the MLflow run of lost trial %d: %s", frozen.number, exc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(ctx.study, frozen)


def _recover(ctx: _Context) -> list[int]:
    """Fail the running trials of dead workers (call under the lock); returns their numbers."""
    lost = []
    if ctx.rdb is not None:  # heartbeats: Optuna fails the silent ones and calls _lost
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(ctx.study)
    for t in ctx.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get(WORKER_ATTR)
        # Trials are asked and stamped under the lock we hold: an unstamped one is orphaned.
        if worker is not None and worker_alive(worker) is not False:
            continue
        if worker is not None and worker.get("pid") == os.getpid() and worker.get("machine") == MACHINE:
            continue  # ours (not possible in one thread, but never fail a live trial)
        reason = (f"worker {worker['machine']} pid {worker['pid']} is gone" if worker
                  else "trial never started by a worker")
        frozen = ctx.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        if frozen.state == TrialState.FAIL:
            _lost(ctx, frozen, reason)
            lost.append(t.number)
    return lost


def _budget_state(study: optuna.Study, budget: int) -> tuple[str, int]:
    """("done" | "run" | "wait", finished attempts). A failed trial that was queued again
    does not count: its retry takes its place."""
    trials = study.get_trials(deepcopy=False)
    replaced = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    attempts = [t for t in trials if t.number not in replaced]
    finished = sum(t.state.is_finished() for t in attempts)
    if finished >= budget:
        return "done", finished
    if any(t.state == TrialState.WAITING for t in attempts) or len(attempts) < budget:
        return "run", finished
    return "wait", finished


def _ask(study: optuna.Study) -> optuna.Trial:
    with warnings.catch_warnings():
        # We run the heartbeat ourselves (see _heartbeat); Optuna only knows optimize() does.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        return study.ask()


def _objective(ctx: _Context, trial: optuna.Trial, params: dict, run_id: str | None, fold_values: dict) -> float:
    """Train every cv fold with the trial's parameters; the mean of the folds' best values."""
    tcfg = trial_config(ctx.cfg, params)
    metric, epochs = ctx.cfg.tune.metric, ctx.cfg.tune.epochs
    folds = sorted(ctx.cv["fold"].unique())
    scratch = Path(tempfile.mkdtemp(prefix=f"pap-tune-{trial.number}-"))
    try:
        for i, k in enumerate(folds):
            def on_epoch(epoch: int, metrics: dict, i: int = i, k: int = int(k)) -> None:
                step = i * epochs + epoch - 1  # global, from 0
                ctx.runs.epoch(run_id, step, k, metrics)
                value = metrics.get(metric)
                if value is not None and math.isfinite(value):
                    trial.report(float(value), step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at step {step} (fold {k}, epoch {epoch}): "
                                             f"val {metric} {value:.4g}")

            train, val = ctx.cv[ctx.cv["fold"] != k], ctx.cv[ctx.cv["fold"] == k]
            result = train_fold(tcfg, ctx.pipeline, train, val, scratch / f"fold{k}.pt",
                                on_epoch=on_epoch, progress=ctx.progress, fold=int(k))
            fold_values[int(k)] = result.best_metric
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    values = list(fold_values.values())
    return float(np.mean(values)) if all(math.isfinite(v) for v in values) else float("nan")


def _run_trial(ctx: _Context, trial: optuna.Trial) -> FrozenTrial:
    # Set by RetryHeartbeatStaleTrialCallback on a re-queued trial: the first lost one.
    frozen = next(t for t in ctx.study.get_trials(deepcopy=False) if t.number == trial.number)
    retry_of = frozen.system_attrs.get("failed_trial")
    params = {name: trial.suggest_float(name, d.low, d.high, log=d.log)
              for name, d in search_space(ctx.cfg, ctx.pipeline).items()}
    run_id = ctx.runs.start_trial(trial, params, trial_config(ctx.cfg, params), retry_of)
    if run_id is not None:
        trial.set_user_attr(RUN_ATTR, run_id)
    _say(ctx, f"trial {trial.number} starts: " + ", ".join(f"{k}={v:.3g}" for k, v in params.items())
         + (f" (retry of trial {retry_of})" if retry_of is not None else ""))
    fold_values: dict[int, float] = {}
    value, state, reason, error = None, None, "", None
    started = time.monotonic()
    with _heartbeat(ctx.rdb, ctx.study.study_name, trial.number, ctx.cfg.tune.heartbeat_interval):
        try:
            value = _objective(ctx, trial, params, run_id, fold_values)
        except optuna.TrialPruned as exc:
            state, reason = TrialState.PRUNED, str(exc)
        except BaseException as exc:  # noqa: BLE001 - failed in Optuna and MLflow, then raised
            state, reason, error = TrialState.FAIL, f"{type(exc).__name__}: {exc}", exc
    if state is None and not math.isfinite(value):
        state, reason = TrialState.FAIL, f"the objective is not finite (fold values {fold_values})"
    if state is None:
        frozen = ctx.study.tell(trial, value)
    else:
        frozen = ctx.study.tell(trial, state=state)
    label = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(frozen.state, "failed")
    ctx.runs.end_trial(run_id, label, value if label == "complete" else None, fold_values, reason)
    _say(ctx, f"trial {trial.number} {label} in {time.monotonic() - started:.1f} s"
         + (f": {ctx.cfg.tune.metric} {value:.4f}" if label == "complete" else f" ({reason})"))
    if error is not None:
        raise error
    return frozen


def _prepare(cfg: Config, pipeline: str, manifest: pd.DataFrame, splits: pd.DataFrame, out_dir: Path, *,
             storage: str | None, study_name: str | None, n_trials: int | None, progress: bool,
             track: bool) -> _Context:
    from pap_severity.tracking import data_source_of

    get_pipeline(pipeline)
    if cfg.tune.metric not in STOPPING_METRICS:
        raise ValueError(f"tune.metric {cfg.tune.metric!r} is not a metric; choose from "
                         f"{', '.join(sorted(STOPPING_METRICS))}")
    cv = cv_items(manifest, splits)
    settings = study_settings(cfg, pipeline, cv)
    name = study_name or default_study_name(cfg, pipeline, cv)
    storage_url = storage if storage is not None else cfg.tune.storage
    budget = n_trials if n_trials is not None else cfg.tune.n_trials
    if budget < 1:
        raise ValueError(f"n_trials must be at least 1, got {budget}")
    data_source = data_source_of(manifest)
    runs = _Runs(cfg, pipeline, data_source, track)
    holder: dict = {}
    optuna_storage, lock, rdb = _open_storage(
        storage_url, Path(out_dir) / pipeline / STUDY_FILE, cfg, name,
        lambda study, frozen: _lost(holder["ctx"], frozen, "no heartbeat for tune.grace_period seconds"),
    )
    sampler = TrialSeededTPE(cfg.tune.seed, n_startup_trials=max(1, min(10, budget // 2)))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.tune.pruner_startup_trials,
                                         n_warmup_steps=cfg.tune.pruner_warmup_steps)
    with lock:
        study = optuna.create_study(study_name=name, storage=optuna_storage, sampler=sampler, pruner=pruner,
                                    direction=direction_of(cfg.tune.metric), load_if_exists=True)
        attrs = {"pipeline": pipeline, "metric": cfg.tune.metric,
                 "objective": OBJECTIVE.format(metric=cfg.tune.metric), "data_source": data_source,
                 "settings": settings}
        for key, value in attrs.items():
            if study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)
        if study.user_attrs.get("n_trials") != budget:
            study.set_user_attr("n_trials", budget)
        ctx = _Context(cfg, pipeline, cv, study, storage_url or str(Path(out_dir) / pipeline / STUDY_FILE),
                       lock, rdb, runs, budget, progress)
        holder["ctx"] = ctx
        runs.open_parent(study, ctx.storage_url, settings, done=_budget_state(study, budget)[0] == "done")
    return ctx


def _work(ctx: _Context, timeout: float | None) -> list[int]:
    """Take trials until the budget is finished (waiting for other workers' running trials)."""
    started = time.monotonic()
    ran: list[int] = []
    waiting_said = False
    while True:
        if timeout is not None and time.monotonic() - started >= timeout:
            _say(ctx, f"timeout ({timeout:g} s): no new trials from this worker")
            break
        with ctx.lock:
            lost = _recover(ctx)
            decision, finished = _budget_state(ctx.study, ctx.budget)
            trial = None
            if decision == "run":
                trial = _ask(ctx.study)
                trial.set_user_attr(WORKER_ATTR, this_worker())
                if ctx.rdb is not None:  # a first beat before the lock goes: never a silent RUNNING trial
                    ctx.rdb.record_heartbeat(ctx.rdb.get_trial_id_from_study_id_trial_number(
                        ctx.rdb.get_study_id_from_name(ctx.study.study_name), trial.number))
                if trial.user_attrs.get(RUN_ATTR):  # a re-queued trial: its lost run is not ours
                    trial.set_user_attr(RUN_ATTR, None)
        for number in lost:
            _say(ctx, f"trial {number} lost its worker: failed, its parameters queued again")
        if decision == "done":
            break
        if decision == "wait":
            if not waiting_said:
                _say(ctx, f"budget taken ({finished}/{ctx.budget} finished): waiting for running trials")
                waiting_said = True
            time.sleep(POLL_SECONDS)
            continue
        waiting_said = False
        _run_trial(ctx, trial)
        ran.append(trial.number)
    return ran


def summarize(study: optuna.Study, budget: int | None = None) -> dict:
    """The study's state and best trial as written to best_params.json."""
    trials = study.get_trials(deepcopy=False)
    count = {s: sum(t.state == s for t in trials) for s in TrialState}
    budget = budget if budget is not None else int(study.user_attrs.get("n_trials", 0))
    metric = study.user_attrs.get("metric")
    summary: dict[str, Any] = {
        "pipeline": study.user_attrs.get("pipeline"),
        "study_name": study.study_name,
        "metric": metric,
        "direction": study.direction.name.lower(),
        "objective": study.user_attrs.get("objective"),
        "value": None,
        "params": {},
        "best_trial": None,
        "n_trials": budget,
        "n_complete": count[TrialState.COMPLETE],
        "n_pruned": count[TrialState.PRUNED],
        "n_failed": count[TrialState.FAIL],
        "n_running": count[TrialState.RUNNING],
        "n_waiting": count[TrialState.WAITING],
        "finished": _budget_state(study, budget)[0] == "done" if budget else False,
        "epochs": (study.user_attrs.get("settings") or {}).get("epochs"),
        "data_source": study.user_attrs.get("data_source"),
        "mlflow_run_id": study.user_attrs.get(PARENT_ATTR),
    }
    if count[TrialState.COMPLETE]:
        best = study.best_trial
        summary.update(value=float(best.value), params=dict(best.params), best_trial=best.number,
                       mlflow_trial_run_id=best.user_attrs.get(RUN_ATTR))
    return summary


def run_worker(
    cfg: Config,
    pipeline: str,
    manifest: pd.DataFrame,
    splits: pd.DataFrame,
    out_dir: str | Path = "tuning",
    *,
    storage: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: bool = True,
    track: bool = True,
) -> dict:
    """One worker of the pipeline's study: takes trials until the study's budget is finished.

    storage: None -> tune.storage; "" -> the journal file `out_dir/<pipeline>/study.journal`;
    a path -> that journal file; a URL (postgresql://...) -> an RDB storage many workers share.
    n_trials / timeout: None -> tune.n_trials / tune.timeout. track: log to MLflow
    (tracking.tracking_uri(cfg)). Returns `summarize(study)` plus `trials_run`, the numbers
    of the trials this worker ran.
    """
    ctx = _prepare(cfg, pipeline, manifest, splits, Path(out_dir), storage=storage, study_name=study_name,
                   n_trials=n_trials, progress=progress, track=track)
    try:
        ran = _work(ctx, timeout if timeout is not None else cfg.tune.timeout)
        summary = summarize(ctx.study, ctx.budget)
        if summary["finished"]:
            ctx.runs.finish(summary)
        summary["storage"] = redact(ctx.storage_url)
        summary["trials_run"] = ran
        return summary
    finally:
        ctx.lock.close()


def tune(
    cfg: Config,
    pipeline: str,
    manifest: pd.DataFrame,
    splits: pd.DataFrame,
    out_dir: str | Path = "tuning",
    *,
    storage: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    progress: bool = True,
    track: bool = True,
) -> dict:
    """Run (or resume, or join) the pipeline's study, then write `out_dir/<pipeline>/best_params.json`.

    Same arguments as `run_worker`. Returns the content of best_params.json. Raises
    RuntimeError when no trial completed.
    """
    summary = run_worker(cfg, pipeline, manifest, splits, out_dir, storage=storage, study_name=study_name,
                         n_trials=n_trials, timeout=timeout, progress=progress, track=track)
    if summary["value"] is None:
        raise RuntimeError(
            f"study {summary['study_name']}: no trial completed ({summary['n_pruned']} pruned, "
            f"{summary['n_failed']} failed); see the MLflow runs or `optuna-dashboard`"
        )
    best = {k: v for k, v in summary.items() if k != "trials_run"}
    write_best_params(Path(out_dir) / pipeline / BEST_FILE, best)
    return best


def write_best_params(path: str | Path, best: dict) -> Path:
    return write_json(best, path, sort_keys=True)


def read_best_params(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tuned parameters; run `pap-severity tune --pipeline ...` first")
    best = json.loads(path.read_text())
    if not isinstance(best.get("params"), dict) or "lr" not in best["params"]:
        raise ValueError(f"{path}: not a best_params.json written by pap-severity tune")
    return best


def load_study(cfg: Config, pipeline: str, manifest: pd.DataFrame, splits: pd.DataFrame,
               out_dir: str | Path = "tuning", *, storage: str | None = None,
               study_name: str | None = None) -> optuna.Study:
    """The pipeline's study as run_worker would open it (read it without running trials)."""
    cv = cv_items(manifest, splits)
    name = study_name or default_study_name(cfg, pipeline, cv)
    url = storage if storage is not None else cfg.tune.storage
    if "://" in url:
        return optuna.load_study(study_name=name, storage=storage_url(url))
    path = Path(url) if url else Path(out_dir) / pipeline / STUDY_FILE
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(path))))


__all__ = [
    "BEST_FILE",
    "STUDY_FILE",
    "TrialSeededTPE",
    "apply_best_params",
    "cv_items",
    "default_study_name",
    "direction_of",
    "load_study",
    "read_best_params",
    "run_worker",
    "search_space",
    "study_settings",
    "summarize",
    "trial_config",
    "tune",
    "write_best_params",
]
