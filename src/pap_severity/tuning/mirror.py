"""The MLflow mirror of a study: what the study holds, shown where the project's runs are.

One parent run per study, `tune-<pipeline>`, created by the first worker; its id is a study
user attr (`PARENT_ATTR`), so every worker and every resume logs under the same parent (share
one tracking server between machines through MLFLOW_TRACKING_URI). Its params state the
objective, the sampler, the pruner and each `space.<key>`.
One nested run per trial, `trial-<number>`: the trial's full settings as params (the searched
ones among them, named in `tuned`); every epoch's `val_<metric>` and `val_loss` at the global
step; the objective (`objective`, and `fold<k>_best_<metric>`); and the tag
`state` = complete | pruned | failed (run status FINISHED, KILLED, FAILED). The parent gets
the best value and parameters (metrics `best_<key>` for numbers, tags `best.<key>` for all)
and the trial counts when the budget is spent.

Logging uses MlflowClient with explicit run ids (Optuna's MLflowCallback is deprecated in
Optuna 5). The study is the record: MLflow failing never fails a trial's bookkeeping.
"""

from __future__ import annotations

import logging
import time

import optuna

from pap_severity.config import Config
from pap_severity.evaluation import direction_of
from pap_severity.tracking import flatten_params, log_params, redact
from pap_severity.tuning.space import OBJECTIVE

log = logging.getLogger(__name__)

RUN_ATTR = "mlflow_run_id"
PARENT_ATTR = "mlflow_parent_run_id"


def _describe(entry: dict) -> str:
    """A search-space entry as a param: `[0.0001, 0.003] log`, `[10, 40] step 10`, `{64, 96}`."""
    if "choices" in entry:
        return "{" + ", ".join(str(c) for c in entry["choices"]) + "}"
    text = f"[{entry['low']}, {entry['high']}]"
    return text + (" log" if entry.get("log") else "") + (f" step {entry['step']}" if "step" in entry else "")


class Mirror:
    """The study's MLflow parent run and one nested run per trial; does nothing when disabled."""

    def __init__(self, cfg: Config, pipeline: str, data_source: str, enabled: bool) -> None:
        self.enabled = enabled
        self.pipeline = pipeline
        self.metric = cfg.tune.metric
        self.parent_id: str | None = None
        if not enabled:
            return
        from pap_severity.tracking import Tracker

        self.tracker = Tracker(cfg, data_source)
        self.client = self.tracker.client
        self.tags = {**self.tracker.tags, "pipeline": pipeline}

    def open_parent(self, study: optuna.Study, storage: str, settings: dict, done: bool) -> str | None:
        """The parent run named in the study's user attrs, or a new one (call under the budget lock)."""
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
            params = {
                "pipeline": self.pipeline,
                "study_name": study.study_name,
                "objective": OBJECTIVE.format(metric=settings["metric"]),
                "tune.metric": settings["metric"],
                "direction": direction_of(settings["metric"]),
                "tune.epochs": settings["epochs"],
                "tune.seed": settings["seed"],
                "sampler": "TPESampler(multivariate, constant_liar, seed per budget slot)",
                "pruner": "MedianPruner(n_startup_trials={}, n_warmup_steps={})".format(*settings["pruner"]),
                **{f"space.{k}": _describe(v) for k, v in settings["space"].items()},
            }
            log_params(self.client, self.parent_id, params)
            if not known:
                study.set_user_attr(PARENT_ATTR, self.parent_id)
                study.set_user_attr("mlflow_experiment_id", self.tracker.experiment_id)
        if not done:
            self.client.update_run(self.parent_id, status="RUNNING")
        return self.parent_id

    def start_trial(self, trial: optuna.Trial, params: dict, tcfg: Config, retry_of: int | None) -> str | None:
        """A nested run for a trial: its settings as params (the tuned values among them)."""
        if not self.enabled:
            return None
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = {**self.tags, MLFLOW_PARENT_RUN_ID: self.parent_id, "optuna.study": trial.study.study_name,
                "optuna.trial": str(trial.number), "state": "running"}
        if retry_of is not None:
            tags["optuna.retry_of"] = str(retry_of)
        run = self.client.create_run(self.tracker.experiment_id, run_name=f"trial-{trial.number}", tags=tags)
        run_id = run.info.run_id
        log_params(self.client, run_id, {**flatten_params(tcfg, self.pipeline), "trial": trial.number,
                                         "tuned": ",".join(params)})
        return run_id

    def epoch(self, run_id: str | None, step: int, fold: int, metrics: dict) -> None:
        if not self.enabled or run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {f"val_{self.metric}": metrics.get(self.metric), "val_loss": metrics.get("loss"), "fold": fold}
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None]
        self.client.log_batch(run_id, metrics=batch)

    def end_trial(self, run_id: str | None, state: str, value: float | None = None,
                  fold_values: dict | None = None, reason: str = "") -> None:
        if not self.enabled or run_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"fold{k}_best_{self.metric}", float(v), now, 0) for k, v in (fold_values or {}).items()]
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
        """The study's result on the parent run, once (a later worker or rerun finds it logged)."""
        if not self.enabled or self.parent_id is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {"n_complete": summary["n_complete"], "n_pruned": summary["n_pruned"],
                  "n_failed": summary["n_failed"]}
        best = summary["params"] if summary.get("value") is not None else {}
        if best:
            values["best_value"] = summary["value"]
            values.update({f"best_{k}": v for k, v in best.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)})
        run = self.client.get_run(self.parent_id)
        if run.info.status == "FINISHED" and all(run.data.metrics.get(k) == float(v) for k, v in values.items()) \
                and all(run.data.tags.get(f"best.{k}") == str(v) for k, v in best.items()):
            return  # logged by another worker, or by an earlier run of a finished study
        self.client.log_batch(self.parent_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
        for key, value in best.items():
            self.client.set_tag(self.parent_id, f"best.{key}", str(value))
        self.client.set_tag(self.parent_id, "n_trials", str(summary["n_trials"]))
        if summary.get("best_trial") is not None:
            self.client.set_tag(self.parent_id, "best_trial", str(summary["best_trial"]))
        self.client.set_terminated(self.parent_id, status="FINISHED" if summary["finished"] else "KILLED")
