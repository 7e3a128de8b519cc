"""MLflow runs for the training stages: one parent run per pipeline, one nested run per fold.

MLflow mirrors the files the DVC stages write; it is never the only place a result lives.

- Store: `cfg.mlflow.tracking_uri` (default `sqlite:///mlflow.db`, at the project root when
  run from there); the `MLFLOW_TRACKING_URI` environment variable overrides it. With a
  SQLite store the artifacts go to `mlruns/` next to the database file.
- One experiment, `cfg.mlflow.experiment`, tagged `mlflow.experimentKind` =
  `custom_model_development` so that the UI opens on its training runs (not the GenAI
  traces page). A pipeline's parent run is named after the pipeline, its nested fold runs
  `fold-<k>`. Both carry the flattened settings as params (`pipeline`, `model.*`, `train.*`,
  `loss.*`, `augment.*`), a description naming the data source, and the tags `data_source`
  (herlev | synthetic), `git_commit`, `params_hash` (short sha256 of the whole config as
  canonical JSON) and `pipeline`; fold runs add `fold`. The manifest is their input
  dataset (`mlflow.data`, its digest that of the cells' paths and sha256).
- Metric names are grouped by what they measure (`metric_name`): `train/...`, `val/...`,
  `calib/...`, `test/...`; the headline metrics (`HEADLINE`) are logged first.
- A fold model is stored once, as the DVC out `models/<pipeline>/fold<k>.pt`. Its fold run
  names it: an MLflow logged model `<pipeline>-fold<k>` that holds no weights (an external
  model) with the file's path, md5 (DVC's digest: the cache holds it at
  `.dvc/cache/files/md5/<2>/<30>`) and size as tags, the same in the run's
  `model_file.json`, and the fold's `test/...` metrics linked to it. Only the registered
  model (`Tracker.log_model`, called by registry.py) is an MLflow `pt2` model: torch.export,
  no pickle, with a tensor signature, a dynamic batch dimension and the preprocessing in its
  metadata and `extra_files/preprocess.json`.
- `CVRuns` is the observer `training.cross_validate` reports to (its `CVCallbacks` methods):
  it opens the runs, logs every epoch live, the fold's final metrics and model file, and
  the means over folds. The run ids go to `<models>/<pipeline>/mlflow_runs.json` as they
  are made, so a resumed cross-validation reopens the same runs, and a later stage reopens
  the parent run with `Tracker.pipeline_run(pipeline, run_id=...)`; a run the store no
  longer holds is named in one line with the command that brings it back.

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

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pap_severity.config import Config
from pap_severity.files import json_ready, write_json

if TYPE_CHECKING:  # torch is imported where a model is logged: the stages that only log metrics skip it
    from pap_severity.checkpoints import ModelBundle

RUNS_FILE = "mlflow_runs.json"
MODEL_FILE = "model_file.json"
DATA_SOURCES = ("herlev", "synthetic")
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
DESCRIPTION_TAG = "mlflow.note.content"
# Logged first, so the UI lists them first: the numbers metrics/headline.json compares.
HEADLINE = ("accuracy", "mse", "mean_auc", "qwk")
PARTS = ("train", "val", "calib", "test")
SOURCE_TEXT = {"herlev": "real Herlev cells", "synthetic": "synthetic cells (not Herlev data)"}
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


def metric_name(key: str) -> str:
    """A metric's MLflow name, grouped by the part it measures: `val_accuracy` -> `val/accuracy`,
    `test_mse_mean` -> `test/mse` (a parent run's metrics are the means over folds),
    `test_mse_std` -> `test/mse_std`, `lr` -> `train/lr`; other names unchanged."""
    if key == "lr":
        return "train/lr"
    part, _, rest = key.partition("_")
    if part not in PARTS or not rest:
        return key
    return f"{part}/{rest.removesuffix('_mean')}"


def _headline_first(values: dict[str, float]) -> dict[str, float]:
    rank = {name: i for i, name in enumerate(HEADLINE)}

    def key(item):
        return rank.get(item[0].partition("/")[2].removeprefix("best_"), len(rank))

    return dict(sorted(values.items(), key=key))


def _grouped(metrics: dict[str, Any]) -> dict[str, float]:
    return _headline_first({metric_name(k): v for k, v in _numeric(metrics).items()})


def file_md5(path: str | Path) -> str:
    """The md5 of a file's bytes: DVC 3's digest, the name of its copy in the DVC cache."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def project_path(path: str | Path) -> str:
    """A path as DVC names it: relative to the working directory (the project root) when inside it."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def manifest_digest(manifest: pd.DataFrame) -> str:
    """Short sha256 of the manifest's cells (path, and sha256 when present), in a fixed order."""
    columns = [c for c in ("path", "sha256", "severity") if c in manifest.columns]
    rows = manifest[columns].astype(str).sort_values(columns).to_csv(index=False)
    return hashlib.sha256(rows.encode()).hexdigest()[:12]


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
                experiment_id = self.client.create_experiment(
                    name, artifact_location=_sqlite_artifact_location(self.uri))
                found = self.client.get_experiment(experiment_id)
            except Exception:  # created meanwhile by a parallel stage
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        wanted = {EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1],
                  DESCRIPTION_TAG: "pap-severity: cross-validated training runs (one per pipeline, nested fold "
                                   "runs), tuning studies and the registered models. Each run's data_source "
                                   "tag and description say which cells it saw."}
        for key, value in wanted.items():
            if found.tags.get(key) != value:
                self._set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id

    def _set_experiment_tag(self, experiment_id: str, key: str, value: str) -> None:
        """Two stages starting at once both find the tag missing; the store refuses the second insert
        (a UNIQUE constraint), which is no error when the tag now holds the value."""
        try:
            self.client.set_experiment_tag(experiment_id, key, value)
        except Exception:
            if self.client.get_experiment(experiment_id).tags.get(key) != value:
                raise

    def describe(self, what: str) -> str:
        """A run's description: what it is, and the cells it saw (synthetic ones said so)."""
        return f"{what}, on {SOURCE_TEXT[self.data_source]} from `{self.cfg.data.root}`."

    def dataset(self, manifest: pd.DataFrame):
        """The manifest as an MLflow dataset: source the data root, digest `manifest_digest`."""
        import mlflow.data

        with _dataset_warnings():
            return mlflow.data.from_pandas(manifest, source=self.cfg.data.root, name="manifest",
                                           digest=manifest_digest(manifest))

    def _run_tags(self, pipeline: str, **extra: str) -> dict[str, str]:
        return {**self.tags, "pipeline": pipeline, **extra}

    def _reopen(self, run_id: str, where: str | None) -> None:
        """Refuse a recorded run the store no longer holds, in one line that says how to get it back."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            how = (f"`mlflow runs restore --run-id {run_id}` (with MLFLOW_TRACKING_URI={redact(self.uri)}) brings "
                   "it back" if run is not None else "it was purged; rerun the stage with `dvc repro -f` to log it")
            raise LookupError(f"MLflow run {run_id}{f' recorded in {where}' if where else ''} is "
                              f"{'deleted' if run is not None else 'not'} in {redact(self.uri)}: {how}")

    @contextmanager
    def pipeline_run(self, pipeline: str, run_id: str | None = None, *, manifest: pd.DataFrame | None = None,
                     recorded_in: str | Path | None = None) -> Iterator[str]:
        """The pipeline's parent run (new, or the one with run_id reopened); yields its id.
        A new run gets the manifest (when given) as its input dataset."""
        import mlflow

        if run_id is not None:
            self._reopen(run_id, str(recorded_in) if recorded_in else None)
            with mlflow.start_run(run_id=run_id) as run:
                yield run.info.run_id
            return
        description = self.describe(f"Cross-validation of the {pipeline} pipeline: the means over its fold runs")
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=pipeline, description=description,
                              tags=self._run_tags(pipeline)) as run:
            mlflow.log_params(flatten_params(self.cfg, pipeline))
            if manifest is not None:
                with _dataset_warnings():
                    mlflow.log_input(self.dataset(manifest), context="cross-validation")
            yield run.info.run_id

    @contextmanager
    def fold_run(self, fold: int | str, run_id: str | None = None, *,
                 manifest: pd.DataFrame | None = None) -> Iterator[str]:
        """A run nested in the active pipeline run (new, or run_id reopened); yields its id."""
        import mlflow

        parent = mlflow.active_run()
        if parent is None:
            raise RuntimeError("fold_run needs an active pipeline_run")
        if run_id is not None:
            self._reopen(run_id, None)
            with mlflow.start_run(run_id=run_id, nested=True) as run:
                yield run.info.run_id
            return
        pipeline = parent.data.tags.get("pipeline") or self.client.get_run(parent.info.run_id).data.tags["pipeline"]
        description = self.describe(f"Fold {fold} of the {pipeline} pipeline: trained on the other cv folds, "
                                    "early-stopped on this one, measured on the calibration and test parts")
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=f"fold-{fold}", nested=True,
                              parent_run_id=parent.info.run_id, description=description,
                              tags=self._run_tags(pipeline, fold=str(fold))) as run:
            mlflow.log_params({**flatten_params(self.cfg, pipeline), "fold": str(fold)})
            if manifest is not None:
                with _dataset_warnings():
                    mlflow.log_input(self.dataset(manifest), context="training")
            yield run.info.run_id

    def log_epoch(self, metrics: dict[str, Any], step: int) -> None:
        """One epoch's history entry (train_loss, lr, val_*) at step=epoch; the epoch key is skipped."""
        import mlflow

        values = _grouped({k: v for k, v in metrics.items() if k != "epoch"})
        if values:
            mlflow.log_metrics(values, step=step)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None, model_id: str | None = None,
                    dataset=None) -> None:
        """Numeric metrics under their grouped names (`metric_name`), headline ones first; with
        model_id (and dataset), linked to that logged model (and dataset) in the UI."""
        import mlflow

        values = _grouped(metrics)
        if values:
            with _dataset_warnings():
                mlflow.log_metrics(values, step=step, model_id=model_id, dataset=dataset)

    def record_model_file(self, name: str, path: str | Path, pipeline: str) -> dict:
        """Name a model file stored by DVC in the active run, without copying it: an external
        MLflow logged model `name` whose tags give the file's path, md5 and size, and the same
        in the run's `model_file.json`. Returns that record with the model's `model_id`."""
        import mlflow

        path = Path(path)
        record = {"name": name, "path": project_path(path), "md5": file_md5(path), "bytes": path.stat().st_size,
                  "restore": f"dvc checkout {project_path(path)}"}
        model = mlflow.create_external_model(
            name=name, model_type="pap-severity fold model", experiment_id=self.experiment_id,
            tags={**self.tags, "pipeline": pipeline, "dvc_path": record["path"], "md5": record["md5"],
                  "bytes": str(record["bytes"])},
        )
        record["model_id"] = model.model_id
        mlflow.log_dict(record, MODEL_FILE)
        return record

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifacts(str(directory), artifact_path=artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def log_model(self, bundle: ModelBundle, input_example: np.ndarray | None = None, name: str | None = None,
                  metadata: dict | None = None) -> str:
        """Log the bundle's model to the active run as a pt2 MLflow model; returns its model URI.

        name: the logged model's name, by default `<pipeline>-<role>` (`combined-final` for a
        final model, as the bundle's meta says).

        input_example: preprocessed cells [N, 3, S, S] (float32); at least two rows are used so
        that the batch dimension stays dynamic (torch.export fixes a dimension of size 1).
        metadata: more keys for the model's metadata (registry.served_metadata), over the defaults.
        """
        import mlflow
        import torch
        from mlflow.models import infer_signature

        from pap_severity.transforms import white_input

        name = name or f"{bundle.pipeline.name}-{bundle.meta.get('role') or 'model'}"
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
                # MLflow would load the pt2 back and predict the example only to check it: 2 to 5 s
                # a model. tests/test_registry.py checks that the pyfunc gives the model's numbers.
                validate_serving_input=False,
                tags={"pipeline": bundle.pipeline.name, **self.tags},
            )
        return info.model_uri


@contextmanager
def _dataset_warnings() -> Iterator[None]:
    """Without MLflow's hints on a dataset: its source is a local path (not "ambiguous"), and the
    manifest's integer columns never hold missing values."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified dataset source")
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        yield


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
    pipeline, a nested run per fold. Their ids, and each fold's model record once logged, are
    written to `mlflow_runs.json` as they are made, so a resumed cross-validation (and the
    evaluate stage) reopens the same runs and logs no fold twice."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.data: dict = {}
        self.path: Path | None = None
        self.manifest: pd.DataFrame | None = None
        self._dataset = None

    @contextmanager
    def pipeline_run(self, pipeline: str, out: Path, resume: bool, manifest: pd.DataFrame | None = None
                     ) -> Iterator[str]:
        self.path = Path(out) / RUNS_FILE
        self.data, self.manifest, self._dataset = {}, manifest, None
        if resume and self.path.is_file():
            saved = read_runs(self.path)
            if saved.get("pipeline") == pipeline and saved.get("experiment_id") == self.tracker.experiment_id:
                self.data = saved
        with self.tracker.pipeline_run(pipeline, run_id=self.data.get("parent_run_id"), manifest=manifest,
                                       recorded_in=self.path) as run_id:
            self.data.update(pipeline=pipeline, experiment_id=self.tracker.experiment_id, parent_run_id=run_id)
            self._save()
            yield run_id

    @contextmanager
    def fold_run(self, fold: str) -> Iterator[str]:
        saved = self._fold(fold)
        with self.tracker.fold_run(fold, run_id=saved.get("run_id"), manifest=self.manifest) as run_id:
            saved["run_id"] = run_id
            self._save()
            yield run_id

    def on_epoch(self, entry: dict) -> None:
        self.tracker.log_epoch(entry, step=entry["epoch"])

    def on_fold_end(self, fold: str, result, metrics: dict[str, float]) -> None:
        """The epochs of a fold trained before its run existed (finished without tracking); then,
        unless logged before an interruption, the fold's model file (`Tracker.record_model_file`)
        and its best epoch and the kept model's metrics, linked to it: `val/...` on its validation
        fold (the per-epoch curves are `val/...` too, at step = epoch; the kept model's are at
        step 0 under `val/best_...`), `calib/...` and `test/...`. `result` is a training.FoldResult
        (not imported: the stages that only log stay off training.py)."""
        saved = self._fold(fold)
        run = self.tracker.client.get_run(saved["run_id"])
        if "train/loss" not in run.data.metrics:
            for entry in result.history:
                self.tracker.log_epoch(entry, step=entry["epoch"])
        if saved.get("metrics_logged"):
            return
        if not saved.get("model"):
            pipeline = self.data["pipeline"]
            saved["model"] = self.tracker.record_model_file(f"{pipeline}-fold{fold}", result.checkpoint, pipeline)
            self._save()
        final = {("val_best_" + key[4:] if key.startswith("val_") else key): v for key, v in metrics.items()}
        dataset = self._manifest_dataset()
        self.tracker.log_metrics({**final, "best_epoch": result.best_epoch}, model_id=saved["model"]["model_id"],
                                 dataset=dataset)
        saved["metrics_logged"] = True
        self._save()

    def on_pipeline_end(self, fold_metrics: list[dict[str, float]]) -> None:
        """The means over the folds, on the parent run, named as on the fold runs
        (`test/accuracy` there is the folds' mean)."""
        means = pd.DataFrame(fold_metrics).mean(numeric_only=True)
        self.tracker.log_metrics({("val_best_" + name[4:] if name.startswith("val_") else name) + "_mean": float(v)
                                  for name, v in means.items()})

    def _manifest_dataset(self):
        if self._dataset is None and self.manifest is not None:
            self._dataset = self.tracker.dataset(self.manifest)
        return self._dataset

    def _fold(self, fold: str) -> dict:
        return self.data.setdefault("folds", {}).setdefault(str(fold), {})

    def _save(self) -> None:
        write_runs(self.path, self.data)
