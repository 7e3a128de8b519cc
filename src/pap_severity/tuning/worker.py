"""The worker loop: one process taking trials of a pipeline's Optuna study until its budget is spent.

The objective is one scalar: **the mean over the cv folds of the validation `tune.metric` at
each fold's best epoch**, maximised (minimised for mse, mae and macro_mae). A trial trains one
model per cv fold with `space.trial_config`; a fold whose metric is undefined (NaN) fails the
trial. Only the `part == cv` rows of the splits are read: the test part never reaches tuning.

Sampler: a TPE (multivariate, constant liar for parallel workers), fresh for each trial and
seeded from `tune.seed` and the trial's **budget slot**: its place among the trials that count
towards the budget (a lost trial's retry takes the lost trial's slot, which then no longer
counts). A trial's draws thus depend on the seed, its slot and the finished trials, never on
which worker runs it or on a worker killed before it: TPE reads complete and pruned trials
(running ones too, for the constant liar), never failed ones, so a lost trial leaves no mark.
With one worker at a time, a study killed and resumed draws what an uninterrupted one draws.
The first half of the budget (at most 10 trials) is random exploration. A median pruner
(`tune.pruner_startup_trials`, `tune.pruner_warmup_steps`) sees every epoch's validation value
at step = fold index * E + epoch - 1 (from 0), E the most epochs a trial may train
(`space.trial_epochs`), so a step means the same in every trial.

Budget: `tune.n_trials` is the budget of the whole study, split between all workers: a worker
starts a trial only while fewer than n_trials trials are finished or running, decided under
the storage's budget lock, so the study ends with exactly n_trials finished trials (complete,
pruned or failed by the objective), plus the failed trials of killed workers, each re-queued
once with the same parameters. A worker that finds the budget taken waits for the running
trials, then returns. `tune.timeout` (seconds, optional) stops a worker from starting new
trials after that long (per worker run, as in Optuna's optimize).

Lost workers: a worker that starts, or looks for work, fails the running trials whose worker is
gone (its process gone from this machine, or, on PostgreSQL, silent for tune.grace_period
seconds), closes their MLflow runs as failed, and queues their parameters again (Optuna's
RetryHeartbeatStaleTrialCallback, one retry). The best trial is the best value among complete
trials, ties going to the earliest, on every storage.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import FrozenTrial, TrialState

from pap_severity.config import Config
from pap_severity.evaluation import STOPPING_METRICS, direction_of
from pap_severity.tracking import redact
from pap_severity.tuning.mirror import PARENT_ATTR, RUN_ATTR, Mirror
from pap_severity.tuning.space import (
    BEST_FILE,
    OBJECTIVE,
    cv_items,
    default_study_name,
    format_params,
    search_space,
    setting,
    study_settings,
    trial_config,
    trial_epochs,
    write_best_params,
)
from pap_severity.tuning.storage import (
    MACHINE,
    STUDY_FILE,
    WORKER_ATTR,
    Storage,
    heartbeat,
    open_storage,
    this_worker,
    worker_alive,
)

log = logging.getLogger(__name__)

# A trial lost with its worker is queued again this many times, then stays failed.
MAX_RETRY = 1
# Seconds between looks at the study while other workers' trials are running.
POLL_SECONDS = 1.0


def distributions(cfg: Config, pipeline: str) -> dict[str, BaseDistribution]:
    """The Optuna distributions of a pipeline's search space, typed like the settings they set."""
    out: dict[str, BaseDistribution] = {}
    for key, entry in search_space(cfg, pipeline).items():
        if entry.choices is not None:
            out[key] = CategoricalDistribution(entry.choices)
        elif isinstance(setting(cfg, key), int):
            out[key] = IntDistribution(int(entry.low), int(entry.high), log=entry.log, step=int(entry.step or 1))
        else:
            out[key] = FloatDistribution(entry.low, entry.high, log=entry.log, step=entry.step)
    return out


def _suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def replaced_trials(trials: list[FrozenTrial]) -> set[int]:
    """The numbers of lost trials that were queued again: their retries take their place."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def budget_slot(trials: list[FrozenTrial], number: int) -> int:
    """A trial's place in the budget: the trials before it that were not replaced by a retry."""
    replaced = replaced_trials(trials)
    return sum(1 for t in trials if t.number < number and t.number not in replaced)


class SlotSeededTPE(BaseSampler):
    """TPE seeded per trial from (seed, budget slot): a fresh TPESampler for each trial reads the
    shared history from the storage, so the draws depend on the seed, the slot and the finished
    trials, never on the worker, nor on lost trials (failed: TPE never reads them) and their
    retries' higher numbers. Trials are asked under the budget lock, so slots never race."""

    def __init__(self, seed: int, n_startup_trials: int) -> None:
        self.seed = seed
        self.n_startup_trials = n_startup_trials
        self._current: tuple[int, TPESampler] | None = None

    def _tpe(self, study: optuna.Study, trial: FrozenTrial) -> TPESampler:
        if self._current is None or self._current[0] != trial.number:
            slot = budget_slot(study.get_trials(deepcopy=False), trial.number)
            seed = int(np.random.SeedSequence([self.seed, slot]).generate_state(1)[0])
            self._current = (trial.number, TPESampler(seed=seed, n_startup_trials=self.n_startup_trials,
                                                      multivariate=True, constant_liar=True))
        return self._current[1]

    def before_trial(self, study, trial):
        self._tpe(study, trial).before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._tpe(study, trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._tpe(study, trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._tpe(study, trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self._tpe(study, trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:  # the seed is per trial already
        pass


@dataclass
class _Context:
    cfg: Config
    pipeline: str
    cv: pd.DataFrame
    study: optuna.Study
    storage: Storage
    mirror: Mirror
    budget: int
    progress: bool


def _say(ctx: _Context, message: str) -> None:
    log.info(message)
    if ctx.progress:
        print(f"[tune {ctx.pipeline}] {message}", file=sys.stderr, flush=True)


def _lost(ctx: _Context, frozen: FrozenTrial, reason: str) -> None:
    """A trial whose worker is gone: fail its MLflow run, queue its parameters again."""
    try:
        ctx.mirror.end_trial(frozen.user_attrs.get(RUN_ATTR), "failed", reason=reason)
    except Exception as exc:  # MLflow unreachable: the study matters more
        log.warning("could not mark the MLflow run of lost trial %d: %s", frozen.number, exc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(ctx.study, frozen)


def _recover(ctx: _Context) -> list[int]:
    """Fail the running trials of dead workers (call under the lock); returns their numbers."""
    lost = []
    if ctx.storage.rdb is not None:  # heartbeats: Optuna fails the silent ones and calls _lost
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
    replaced = replaced_trials(trials)
    attempts = [t for t in trials if t.number not in replaced]
    finished = sum(t.state.is_finished() for t in attempts)
    if finished >= budget:
        return "done", finished
    if any(t.state == TrialState.WAITING for t in attempts) or len(attempts) < budget:
        return "run", finished
    return "wait", finished


def _ask(study: optuna.Study) -> optuna.Trial:
    with warnings.catch_warnings():
        # We run the heartbeat ourselves (see storage.heartbeat); Optuna only knows optimize() does.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        return study.ask()


def _objective(ctx: _Context, trial: optuna.Trial, params: dict, run_id: str | None, fold_values: dict) -> float:
    """Train every cv fold with the trial's parameters; the mean of the folds' best values."""
    tcfg = trial_config(ctx.cfg, params)
    metric, stride = ctx.cfg.tune.metric, trial_epochs(ctx.cfg)
    folds = sorted(ctx.cv["fold"].unique())
    scratch = Path(tempfile.mkdtemp(prefix=f"pap-tune-{trial.number}-"))
    from pap_severity.training import train_fold

    try:
        for i, k in enumerate(folds):
            def on_epoch(epoch: int, metrics: dict, i: int = i, k: int = int(k)) -> None:
                step = i * stride + epoch - 1  # global, from 0
                ctx.mirror.epoch(run_id, step, k, metrics)
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
    params = {name: _suggest(trial, name, dist) for name, dist in distributions(ctx.cfg, ctx.pipeline).items()}
    run_id = ctx.mirror.start_trial(trial, params, trial_config(ctx.cfg, params), retry_of)
    if run_id is not None:
        trial.set_user_attr(RUN_ATTR, run_id)
    _say(ctx, f"trial {trial.number} starts: {format_params(params)}"
         + (f" (retry of trial {retry_of})" if retry_of is not None else ""))
    fold_values: dict[int, float] = {}
    value, state, reason, error = None, None, "", None
    started = time.monotonic()
    with heartbeat(ctx.storage.rdb, ctx.study.study_name, trial.number, ctx.cfg.tune.heartbeat_interval):
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
    ctx.mirror.end_trial(run_id, label, value if label == "complete" else None, fold_values, reason)
    _say(ctx, f"trial {trial.number} {label} in {time.monotonic() - started:.1f} s"
         + (f": {ctx.cfg.tune.metric} {value:.4f}" if label == "complete" else f" ({reason})"))
    if error is not None:
        raise error
    return frozen


def _prepare(cfg: Config, pipeline: str, manifest: pd.DataFrame, splits: pd.DataFrame, out_dir: Path, *,
             storage: str | None, study_name: str | None, n_trials: int | None, progress: bool,
             track: bool) -> _Context:
    from pap_severity.tracking import data_source_of

    search_space(cfg, pipeline)  # a known pipeline with something to search, before reading data
    if cfg.tune.metric not in STOPPING_METRICS:
        raise ValueError(f"tune.metric {cfg.tune.metric!r} is not a metric; choose from "
                         f"{', '.join(sorted(STOPPING_METRICS))}")
    cv = cv_items(manifest, splits)
    settings = study_settings(cfg, pipeline, cv)
    name = study_name or default_study_name(cfg, pipeline, cv)
    budget = n_trials if n_trials is not None else cfg.tune.n_trials
    if budget < 1:
        raise ValueError(f"n_trials must be at least 1, got {budget}")
    data_source = data_source_of(manifest)
    holder: dict = {}
    opened = open_storage(
        storage if storage is not None else cfg.tune.storage, Path(out_dir) / pipeline / STUDY_FILE, name,
        heartbeat_interval=cfg.tune.heartbeat_interval, grace_period=cfg.tune.grace_period,
        on_stale=lambda study, frozen: _lost(holder["ctx"], frozen, "no heartbeat for tune.grace_period seconds"),
    )
    try:
        mirror = Mirror(cfg, pipeline, data_source, track)
        sampler = SlotSeededTPE(cfg.tune.seed, n_startup_trials=max(1, min(10, budget // 2)))
        pruner = optuna.pruners.MedianPruner(n_startup_trials=cfg.tune.pruner_startup_trials,
                                             n_warmup_steps=cfg.tune.pruner_warmup_steps)
        with opened.lock:
            study = optuna.create_study(study_name=name, storage=opened.optuna, sampler=sampler, pruner=pruner,
                                        direction=direction_of(cfg.tune.metric), load_if_exists=True)
            attrs = {"pipeline": pipeline, "metric": cfg.tune.metric,
                     "objective": OBJECTIVE.format(metric=cfg.tune.metric), "data_source": data_source,
                     "settings": settings, "n_trials": budget}
            for key, value in attrs.items():
                if study.user_attrs.get(key) != value:
                    study.set_user_attr(key, value)
            ctx = _Context(cfg, pipeline, cv, study, opened, mirror, budget, progress)
            holder["ctx"] = ctx
            mirror.open_parent(study, opened.url, settings, done=_budget_state(study, budget)[0] == "done")
    except BaseException:
        opened.close()
        raise
    return ctx


def _work(ctx: _Context, timeout: float | None) -> list[int]:
    """Take trials until the budget is finished (waiting for other workers' running trials)."""
    started = time.monotonic()
    ran: list[int] = []
    waiting_said = False
    rdb = ctx.storage.rdb
    while True:
        if timeout is not None and time.monotonic() - started >= timeout:
            _say(ctx, f"timeout ({timeout:g} s): no new trials from this worker")
            break
        with ctx.storage.lock:
            lost = _recover(ctx)
            decision, finished = _budget_state(ctx.study, ctx.budget)
            trial = None
            if decision == "run":
                trial = _ask(ctx.study)
                trial.set_user_attr(WORKER_ATTR, this_worker())
                if rdb is not None:  # a first beat before the lock goes: never a silent RUNNING trial
                    rdb.record_heartbeat(rdb.get_trial_id_from_study_id_trial_number(
                        rdb.get_study_id_from_name(ctx.study.study_name), trial.number))
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
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
    if complete:
        # Not study.best_trial: PostgreSQL breaks ties between equal values in any order.
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1.0
        best = min(complete, key=lambda t: sign * t.value)
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
    (tracking.tracking_uri(cfg)). Returns `summarize(study)` plus `storage` (its password
    hidden) and `trials_run`, the numbers of the trials this worker ran.
    """
    ctx = _prepare(cfg, pipeline, manifest, splits, Path(out_dir), storage=storage, study_name=study_name,
                   n_trials=n_trials, progress=progress, track=track)
    try:
        ran = _work(ctx, timeout if timeout is not None else cfg.tune.timeout)
        summary = summarize(ctx.study, ctx.budget)
        if summary["finished"]:
            ctx.mirror.finish(summary)
        summary["storage"] = redact(ctx.storage.url)
        summary["trials_run"] = ran
        return summary
    finally:
        ctx.storage.close()


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
