"""MLflow runs for the training stages: one parent run per pipeline, one nested run per fold.

MLflow mirrors the files the DVC stages write; it is never the only place a result lives.

- Store: `cfg.mlflow.tracking_uri` (default `sqlite:///mlflow.db`, at the project root when
  run from there); the `MLFLOW_TRACKING_URI` environment variable overrides it. With a
  SQLite store the artifacts go to `mlruns/` next to the database file.
- One experiment, `cfg.mlflow.experiment`. A pipeline's parent run is named after the
  pipeline, its nested fold runs `fold-<k>`. Both carry the flattened settings as params
  (`pipeline`, `model.*`, `train.*`, `loss.*`, `augment.*`) and the tags `data_source`
  (herlev | synthetic), `git_commit`, `params_hash` (short sha256 of the whole config as
  canonical JSON) and `pipeline`; fold runs add `fold`.
- Each fold's model is logged with `mlflow.pytorch.log_model` in MLflow 3's default `pt2`
  format (torch.export: no pickle, loads without this package), with a tensor signature,
  a dynamic batch dimension, and the preprocessing in its metadata and in
  `extra_files/preprocess.json`, so a registry consumer can rebuild the input.
- `CVRuns` is the observer `training.cross_validate` reports to (its `CVCallbacks` methods):
  it opens the runs, logs every epoch live, the fold's final metrics and model, and the
  means over folds. The run ids go to `<models>/<pipeline>/mlflow_runs.json` as they are
  made, so a resumed cross-validation reopens the same runs, and a later stage reopens the
  parent run with `Tracker.pipeline_run(pipeline, run_id=...)`.

Training knows nothing of MLflow: it runs without it, and is tracked only when given a CVRuns.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pap_severity.checkpoints import ModelBundle
from pap_severity.config import Config
from pap_severity.files import json_ready, write_json
from pap_severity.transforms import white_input

RUNS_FILE = "mlflow_runs.json"
DATA_SOURCES = ("herlev", "synthetic")
PARAM_SECTIONS = ("model", "train", "loss", "augment")
OUTPUT_LAYOUT = "one float32 tensor [N, K+1]: the head's logits, then the score 1..5 in the last column"


def tracking_uri(cfg: Config) -> str:
    """MLFLOW_TRACKING_URI when set, else mlflow.tracking_uri of the config."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow.tracking_uri


def redact(url: str) -> str:
    """A store URL (MLflow, Optuna, database) with its password replaced by ***, for logs and files."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if "://" not in url or parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def log_params(client, run_id: str, params: dict[str, Any]) -> None:
    """Log params in batches of 100 (MLflow's limit), each value cut to MLflow's 6000 characters."""
    from mlflow.entities import Param

    items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def flatten_params(cfg: Config, pipeline: str) -> dict[str, str]:
    """`pipeline` and `section.key` for the model, train, loss and augment sections."""
    params = {"pipeline": pipeline}
    for section in PARAM_SECTIONS:
        values = getattr(cfg, section).model_dump(mode="json", by_alias=True)
        for key, value in values.items():
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            params[f"{section}.{key}"] = str(value)
    return params


def params_hash(cfg: Config, length: int = 12) -> str:
    """Short sha256 of the whole config as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(cfg.model_dump(mode="json", by_alias=True), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> str:
    """The commit of the code (git rev-parse HEAD), or "unknown" outside a git checkout."""
    return _git("rev-parse", "HEAD") or "unknown"


def data_source_of(manifest: pd.DataFrame) -> str:
    """herlev or synthetic from the manifest's `source` column; any synthetic cell makes it synthetic."""
    if "source" not in manifest.columns:
        raise ValueError("the manifest has no `source` column; rebuild it with `pap-severity data manifest`")
    sources = set(manifest["source"].dropna().astype(str))
    unknown = sources - set(DATA_SOURCES)
    if unknown:
        raise ValueError(f"unknown data source(s) {sorted(unknown)} in the manifest; expected {DATA_SOURCES}")
    return "synthetic" if "synthetic" in sources or not sources else "herlev"


def read_runs(path: str | Path) -> dict:
    """The run ids a cross-validation wrote: pipeline, experiment_id, parent_run_id,
    folds: {"<k>": {"run_id", "model_uri"}}."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no MLflow run ids; run the train stage with tracking")
    return json.loads(path.read_text())


def write_runs(path: str | Path, runs: dict) -> Path:
    return write_json(runs, path, sort_keys=True)


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric scalars of a dict (NaN kept: MLflow stores it), booleans and the rest dropped."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            continue
        out[key] = float(value)
    return out


def _sqlite_artifact_location(uri: str) -> str | None:
    """`mlruns/` next to a SQLite store's file (MLflow's default is ./mlruns in the cwd)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    db = uri[len(prefix):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / "mlruns").as_uri()


class Tracker:
    """MLflow logging for one experiment: `pipeline_run` and `fold_run` context managers,
    and `log_epoch`, `log_metrics`, `log_model`, `log_artifacts` for the active run."""

    def __init__(self, cfg: Config, data_source: str) -> None:
        import mlflow

        if data_source not in DATA_SOURCES:
            raise ValueError(f"data_source must be one of {DATA_SOURCES}, got {data_source!r}")
        self.cfg = cfg
        self.data_source = data_source
        self.uri = tracking_uri(cfg)
        # mlflow.set_tracking_uri also writes MLFLOW_TRACKING_URI into os.environ, which
        # tracking_uri() reads first: keep the fluent URI, restore the environment.
        before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
        self.client = mlflow.MlflowClient(self.uri, registry_uri=self.uri)
        self.experiment_id = self._experiment(cfg.mlflow.experiment)
        self.tags = {
            "data_source": data_source,
            "git_commit": git_commit(),
            "params_hash": params_hash(cfg),
        }

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, artifact_location=_sqlite_artifact_location(self.uri))
            except Exception:  # created meanwhile by a parallel stage
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        return found.experiment_id

    def _run_tags(self, pipeline: str, **extra: str) -> dict[str, str]:
        return {**self.tags, "pipeline": pipeline, **extra}

    @contextmanager
    def pipeline_run(self, pipeline: str, run_id: str | None = None) -> Iterator[str]:
        """The pipeline's parent run (new, or the one with run_id reopened); yields its id."""
        import mlflow

        if run_id is not None:
            with mlflow.start_run(run_id=run_id) as run:
                yield run.info.run_id
            return
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=pipeline,
                              tags=self._run_tags(pipeline)) as run:
            mlflow.log_params(flatten_params(self.cfg, pipeline))
            yield run.info.run_id

    @contextmanager
    def fold_run(self, fold: int | str, run_id: str | None = None) -> Iterator[str]:
        """A run nested in the active pipeline run (new, or run_id reopened); yields its id."""
        import mlflow

        parent = mlflow.active_run()
        if parent is None:
            raise RuntimeError("fold_run needs an active pipeline_run")
        if run_id is not None:
            with mlflow.start_run(run_id=run_id, nested=True) as run:
                yield run.info.run_id
            return
        pipeline = parent.data.tags.get("pipeline") or self.client.get_run(parent.info.run_id).data.tags["pipeline"]
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=f"fold-{fold}", nested=True,
                              parent_run_id=parent.info.run_id,
                              tags=self._run_tags(pipeline, fold=str(fold))) as run:
            mlflow.log_params({**flatten_params(self.cfg, pipeline), "fold": str(fold)})
            yield run.info.run_id

    def log_epoch(self, metrics: dict[str, Any], step: int) -> None:
        """One epoch's history entry (train_loss, lr, val_*) at step=epoch; the epoch key is skipped."""
        import mlflow

        values = {k: v for k, v in _numeric(metrics).items() if k != "epoch"}
        if values:
            mlflow.log_metrics(values, step=step)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        import mlflow

        values = _numeric(metrics)
        if values:
            mlflow.log_metrics(values, step=step)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifacts(str(directory), artifact_path=artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_model(self, bundle: ModelBundle, input_example: np.ndarray | None = None, name: str = "model",
                  metadata: dict | None = None) -> str:
        """Log the bundle's model to the active run as a pt2 MLflow model; returns its model URI.

        input_example: preprocessed cells [N, 3, S, S] (float32); at least two rows are used so
        that the batch dimension stays dynamic (torch.export fixes a dimension of size 1).
        metadata: more keys for the model's metadata (registry.served_metadata), over the defaults.
        """
        import mlflow
        from mlflow.models import infer_signature

        model = copy.deepcopy(bundle.model).to("cpu").to(memory_format=torch.contiguous_format).eval()
        pre = bundle.preprocess
        if input_example is None:
            input_example = white_input(pre)[None].numpy()
        example = np.ascontiguousarray(input_example, dtype=np.float32)
        if example.shape[0] < 2:
            example = np.concatenate([example] * 2)[:2]
        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        signature = infer_signature(example, output)
        description = {
            "pipeline": bundle.pipeline.name,
            "arch": bundle.arch,
            "preprocess": json.loads(pre.to_json()),
            "output": OUTPUT_LAYOUT,
            "score_column": int(output.shape[1] - 1),
            **(metadata or {}),
        }
        with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
            pre_file = pre.save(Path(tmp) / "preprocess.json")
            info_file = Path(tmp) / "bundle.json"
            info_file.write_text(json.dumps({**description, "meta": json_ready(bundle.meta)}, indent=2))
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                input_example=example,
                signature=signature,
                serialization_format="pt2",
                metadata=description,
                extra_files=[str(pre_file), str(info_file)],
                # Pinned torch (+cloudpickle) instead of inferring requirements, which loads
                # the model again in a subprocess (about 10 s a model).
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                tags={"pipeline": bundle.pipeline.name, **self.tags},
            )
        return info.model_uri


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No "Downloading artifacts" bars while MLflow validates the logged model's input example."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


class CVRuns:
    """The MLflow runs of one cross-validation (training.CVCallbacks): a parent run per
    pipeline, a nested run per fold. Their ids, and each fold's model URI once logged, are
    written to `mlflow_runs.json` as they are made, so a resumed cross-validation (and the
    evaluate stage) reopens the same runs and logs no model twice."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.data: dict = {}
        self.path: Path | None = None

    @contextmanager
    def pipeline_run(self, pipeline: str, out: Path, resume: bool) -> Iterator[str]:
        self.path = Path(out) / RUNS_FILE
        self.data = {}
        if resume and self.path.is_file():
            saved = read_runs(self.path)
            if saved.get("pipeline") == pipeline and saved.get("experiment_id") == self.tracker.experiment_id:
                self.data = saved
        with self.tracker.pipeline_run(pipeline, run_id=self.data.get("parent_run_id")) as run_id:
            self.data.update(pipeline=pipeline, experiment_id=self.tracker.experiment_id, parent_run_id=run_id)
            self._save()
            yield run_id

    @contextmanager
    def fold_run(self, fold: str) -> Iterator[str]:
        saved = self._fold(fold)
        with self.tracker.fold_run(fold, run_id=saved.get("run_id")) as run_id:
            saved["run_id"] = run_id
            self._save()
            yield run_id

    def on_epoch(self, entry: dict) -> None:
        self.tracker.log_epoch(entry, step=entry["epoch"])

    def on_fold_end(self, fold: str, result, metrics: dict[str, float]) -> None:
        """The epochs of a fold trained before its run existed (finished without tracking); then,
        unless logged before an interruption, its best epoch and the kept model's metrics
        ("best_val_*": on its validation fold; the per-epoch curves are val_*). `result` is a
        training.FoldResult (not imported: the stages that only log models stay off training.py)."""
        run = self.tracker.client.get_run(self._fold(fold)["run_id"])
        if "train_loss" not in run.data.metrics:
            for entry in result.history:
                self.tracker.log_epoch(entry, step=entry["epoch"])
        if not self._logged(fold):
            final = {("best_" + key if key.startswith("val_") else key): v for key, v in metrics.items()}
            self.tracker.log_metrics({"best_epoch": result.best_epoch, **final})

    def log_model(self, fold: str, bundle: ModelBundle, example: np.ndarray) -> None:
        if not self._logged(fold):
            self._fold(fold)["model_uri"] = self.tracker.log_model(bundle, input_example=example)
            self._save()

    def on_pipeline_end(self, fold_metrics: list[dict[str, float]]) -> None:
        """`<metric>_mean` over the folds, on the parent run."""
        means = pd.DataFrame(fold_metrics).mean(numeric_only=True)
        self.tracker.log_metrics({f"{name}_mean": float(v) for name, v in means.items()})

    def _logged(self, fold: str) -> bool:
        """Whether the fold's final metrics and model were logged (before an interruption)."""
        return bool(self._fold(fold).get("model_uri"))

    def _fold(self, fold: str) -> dict:
        return self.data.setdefault("folds", {}).setdefault(str(fold), {})

    def _save(self) -> None:
        write_runs(self.path, self.data)
