"""The MLflow Model Registry: final models, the promotion rule, the `champion` alias.

- Names: the pipeline `registry.pipeline` (combined) is registered as
  `registry.model_name` ("pap-severity"); every other pipeline as
  `<model_name>-<pipeline>` ("pap-severity-classification", ...), so the UI compares them.
- Each registration is one MLflow run, `register-<pipeline>`, in the `mlflow.experiment`
  experiment, holding: the settings as params; the final model's test metrics as
  `test_<metric>`; the files given (figures, the IG report: report.html,
  attributions.csv, summary.json), under their project-relative folder, with the missing
  ones named in the tag `missing_artifacts`; `reference/reference_io.npz` (inputs and the
  outputs the model gave them, to check any later load); and the model itself, logged by
  `tracking.Tracker.log_model` in the pt2 format (torch.export) with the preprocessing
  and the pipeline in its metadata and in `extra_files/preprocess.json` and `bundle.json`.
- The model version carries the tags `content_hash` (sha256 of the pipeline, the
  architecture, the preprocessing and every weight), `pipeline`, `data_source`,
  `git_commit`, `test_<metric>` for the headline test metrics, `promotion` (promoted |
  not promoted) and `promotion_reason`.
- Promotion rule: a new version takes the alias `registry.alias` ("champion") unless its
  test `registry.metric` is worse than the current champion's by more than
  `registry.margin` (worse = lower, or higher for mse, mae, macro_mae). A missing or NaN
  metric is never promoted over a champion that has one. Otherwise the version is
  registered without the alias and the reason is in its tags and in the result.
- Idempotent: a model whose content hash is already registered under the name adds no
  run and no version; the existing version is returned (`created=False`). So re-running
  the stage with nothing changed adds nothing.
- `models:/pap-severity@champion` loads on a CPU-only machine: the model is exported from
  a CPU copy (Tracker.log_model), so every weight of the pt2 archive is a CPU tensor
  whatever device trained it. (A pt2 model cannot be moved between devices after loading;
  `mlflow.pytorch.load_model` ignores map_location for it.) `load_champion` checks this.
  Checked: a model trained on an H100 (AMP, channels_last) loads here on a CPU-only
  machine and gives the CPU outputs of the trained weights exactly; a pt2 exported from
  the CUDA model itself does not even load without a GPU ("No CUDA GPUs are available").
- The loaded model is a torch.export module in inference mode (BatchNorm uses its running
  statistics): call it, under torch.no_grad(), but never `.eval()`/`.train()` (torch
  raises "Calling eval() is not supported yet"). Input: preprocessed cells
  [N, 3, S, S] float32 (any N); output [N, K+1] (logits, then the score in the last
  column: metadata `score_column`); decode with `pipelines.get_pipeline(meta["pipeline"]).decode`.
- Every lookup here goes through an MlflowClient of `tracking.tracking_uri(cfg)` for
  tracking and registry both; the fluent registry URI is never set (it would leak into
  later calls in the process). Plain `mlflow.pytorch.load_model("models:/pap-severity@champion")`
  works too when MLFLOW_TRACKING_URI (or MLFLOW_REGISTRY_URI) names the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pap_severity.checkpoints import ModelBundle, load_bundle
from pap_severity.config import Config
from pap_severity.evaluation import LOWER_IS_BETTER
from pap_severity.transforms import Preprocess, white_input

log = logging.getLogger(__name__)

REFERENCE_ARTIFACT = "reference/reference_io.npz"
EXPLAIN_FILES = ("report.html", "attributions.csv", "summary.json")
HEADLINE_TAGS = ("accuracy", "balanced_accuracy", "mean_auc", "mse", "mae", "macro_mae", "qwk",
                 "binary_accuracy", "binary_f1", "sensitivity", "specificity")


@dataclass
class RegistrationResult:
    name: str
    version: str
    promoted: bool  # this version holds the alias
    reason: str
    model_uri: str  # models:/<name>/<version>
    run_id: str
    content_hash: str
    created: bool = True  # False: the same model was registered before, nothing was added
    missing_artifacts: list[str] = field(default_factory=list)
    champion_version: str | None = None  # the version holding the alias after this call


def model_name_for(cfg: Config, pipeline: str) -> str:
    """`registry.model_name` for `registry.pipeline`, `<model_name>-<pipeline>` for the others."""
    base = cfg.registry.model_name
    return base if pipeline == cfg.registry.pipeline else f"{base}-{pipeline}"


def explain_artifacts(pipeline: str, reports: str | Path = "reports") -> list[Path]:
    """The IG report files the explain stage writes for a pipeline (which may not exist yet)."""
    return [Path(reports) / "explain" / pipeline / name for name in EXPLAIN_FILES]


def content_hash(bundle: ModelBundle) -> str:
    """sha256 of what the model computes: pipeline, architecture, preprocessing, weights."""
    h = hashlib.sha256()
    h.update(json.dumps({"pipeline": bundle.pipeline.name, "arch": bundle.arch,
                         "preprocess": json.loads(bundle.preprocess.to_json())}, sort_keys=True).encode())
    for key, tensor in sorted(bundle.model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"\n{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The numeric metrics of a dict: plain numbers, or the `mean` of {mean, std, per_fold}."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict) and "mean" in value:
            value = value["mean"]
        if value is None:
            value = float("nan")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            continue
        out[str(key)] = float(value)
    return out


def promotion_decision(metric: str, new: float | None, champion: float | None, margin: float,
                       champion_version: str | None = None) -> tuple[bool, str]:
    """(promote?, reason) under the rule: not worse than the champion by more than margin."""
    lower = metric in LOWER_IS_BETTER
    if champion_version is None:
        return True, "no champion yet"
    new_ok = new is not None and math.isfinite(new)
    champ_ok = champion is not None and math.isfinite(champion)
    if not new_ok:
        if not champ_ok:
            return True, f"neither this version nor champion v{champion_version} has a finite test {metric}"
        return False, f"this version has no finite test {metric}; champion v{champion_version} has {champion:.4f}"
    if not champ_ok:
        return True, f"champion v{champion_version} has no finite test {metric}"
    worse_by = (new - champion) if lower else (champion - new)
    direction = "lower" if lower else "higher"
    summary = f"test {metric} {new:.4f} vs champion v{champion_version} {champion:.4f} ({direction} is better)"
    if worse_by > margin + 1e-12:
        return False, f"{summary}: worse by {worse_by:.4f} > margin {margin:g}"
    if worse_by > 0:
        return True, f"{summary}: worse by {worse_by:.4f}, within margin {margin:g}"
    return True, f"{summary}: not worse"


def _client(cfg: Config):
    """A client of the config's store, for tracking and registry both. Explicit: the fluent
    registry URI (mlflow.set_registry_uri, MLFLOW_REGISTRY_URI) is never read nor set here."""
    import mlflow

    from pap_severity.tracking import tracking_uri

    uri = tracking_uri(cfg)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _champion(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such model, or no version with the alias
        return None


def _version_metric(client, version, metric: str) -> float | None:
    tag = version.tags.get(f"test_{metric}")
    if tag is not None:
        try:
            return float(tag)
        except ValueError:
            return None
    if version.run_id:
        try:
            return client.get_run(version.run_id).data.metrics.get(f"test_{metric}")
        except Exception:  # the run was deleted
            return None
    return None


def _existing(client, name: str, digest: str):
    found = client.search_model_versions(f"name = '{name}' and tags.content_hash = '{digest}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def _artifact_dir(folder: Path) -> str:
    """Where a folder's files go in the run: its project-relative path (reports/explain/combined),
    or `files/<name>` for a folder outside the project."""
    try:
        rel = folder.resolve().relative_to(Path.cwd().resolve())
        return rel.as_posix() if rel.parts else "files"
    except ValueError:
        return f"files/{folder.name}" if folder.name else "files"


def _reference_inputs(bundle: ModelBundle, example: np.ndarray | None) -> np.ndarray:
    """Preprocessed inputs [N, 3, S, S] to record outputs for: the given ones, else a white cell
    and seeded noise (two rows keep the batch dimension dynamic in the export)."""
    if example is not None:
        x = np.ascontiguousarray(example, dtype=np.float32)
        return np.concatenate([x, x])[:2] if x.shape[0] < 2 else x
    white = white_input(bundle.preprocess)[None]
    noise = torch.randn(1, *white.shape[1:], generator=torch.Generator().manual_seed(0))
    return torch.cat([white, noise]).numpy().astype(np.float32)


def register(
    cfg: Config,
    bundle: ModelBundle | str | Path,
    metrics: dict,
    *,
    artifacts: list[str | Path] | tuple = (),
    data_source: str,
    pipeline: str | None = None,
    input_example: np.ndarray | None = None,
    params: dict | None = None,
) -> RegistrationResult:
    """Register a final model (a bundle or its file) with its test metrics; apply the promotion rule.

    metrics: the final model's test metrics (flat numbers, or metrics/<pipeline>.json style
    {mean, std, per_fold}); artifacts: files or folders to log on the run (the missing ones
    are reported, not an error); data_source: herlev | synthetic; pipeline: checked
    against the bundle's; input_example: preprocessed cells for the signature and the
    reference outputs; params: extra params for the run.
    """
    import mlflow
    from mlflow.entities import Metric, Param

    from pap_severity.tracking import Tracker, flatten_params

    if not isinstance(bundle, ModelBundle):
        bundle, _ = load_bundle(bundle, map_location="cpu")
    if pipeline is not None and pipeline != bundle.pipeline.name:
        raise ValueError(f"the bundle holds a {bundle.pipeline.name!r} model, not {pipeline!r}")
    pipeline = bundle.pipeline.name
    reg = cfg.registry
    name = model_name_for(cfg, pipeline)
    digest = content_hash(bundle)
    tracker = Tracker(cfg, data_source)  # checks data_source; sets up the store and experiment
    client = _client(cfg)

    existing = _existing(client, name, digest)
    if existing is not None:
        champion = _champion(client, name, reg.alias)
        held = champion is not None and str(champion.version) == str(existing.version)
        # The reason recorded when the version was made, so a re-run reports exactly what the first did.
        reason = existing.tags.get("promotion_reason", "")
        log.info("already registered as %s v%s (content hash %s); nothing added", name, existing.version, digest[:12])
        missing = [m.strip() for m in existing.tags.get("missing_artifacts", "").split(",") if m.strip()]
        return RegistrationResult(name, str(existing.version), held, reason, f"models:/{name}/{existing.version}",
                                  existing.run_id, digest, created=False, missing_artifacts=missing,
                                  champion_version=str(champion.version) if champion else None)

    values = scalar_metrics(metrics)
    new_value = values.get(reg.metric)
    champion = _champion(client, name, reg.alias)
    champ_value = _version_metric(client, champion, reg.metric) if champion is not None else None
    promoted, reason = promotion_decision(reg.metric, new_value, champ_value, reg.margin,
                                          str(champion.version) if champion is not None else None)

    paths = [Path(p) for p in artifacts]
    missing = [str(p) for p in paths if not p.exists()]
    inputs = _reference_inputs(bundle, input_example)
    model = bundle.model.to("cpu").eval()
    with torch.no_grad():
        outputs = model(torch.from_numpy(inputs)).numpy()

    tags = {**tracker.tags, "pipeline": pipeline, "role": "final", "content_hash": digest,
            "registered_model": name}
    if missing:
        tags["missing_artifacts"] = ", ".join(missing)
    with mlflow.start_run(experiment_id=tracker.experiment_id, run_name=f"register-{pipeline}", tags=tags) as run:
        run_id = run.info.run_id
        run_params = {**flatten_params(cfg, pipeline), **{f"registry.{k}": str(v) for k, v in
                                                          reg.model_dump(mode="json").items()},
                      **{str(k): str(v) for k, v in (params or {}).items()}}
        items = [Param(k, v[:6000]) for k, v in run_params.items()]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i:i + 100])
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"test_{k}", v, now, 0) for k, v in values.items()])
        for path in paths:
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=_artifact_dir(path))
            elif path.is_file():
                mlflow.log_artifact(str(path), artifact_path=_artifact_dir(path.parent))
        with tempfile.TemporaryDirectory() as tmp:
            ref = Path(tmp) / Path(REFERENCE_ARTIFACT).name
            np.savez(ref, inputs=inputs, outputs=outputs)
            mlflow.log_artifact(str(ref), artifact_path=str(Path(REFERENCE_ARTIFACT).parent))
        model_uri = tracker.log_model(bundle, input_example=inputs)

    version_tags = {
        "content_hash": digest,
        "pipeline": pipeline,
        "data_source": data_source,
        "git_commit": tracker.tags["git_commit"],
        "params_hash": tracker.tags["params_hash"],
        **{f"test_{k}": f"{values[k]:.6g}" for k in HEADLINE_TAGS if k in values},
        "promotion": "promoted" if promoted else "not promoted",
        "promotion_reason": reason,
    }
    if missing:
        version_tags["missing_artifacts"] = ", ".join(missing)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(
            name, tags={"pipeline": pipeline},
            description=f"pap-severity {pipeline} pipeline: Herlev cell severity (5 classes) and score 1..5",
        )
    # What mlflow.register_model does for a logged model (models:/m-<id>), through our client.
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(name, source=model_uri, run_id=run_id, tags=version_tags,
                                          model_id=model_id)
    if promoted:
        client.set_registered_model_alias(name, reg.alias, version.version)
    holder = _champion(client, name, reg.alias)
    message = f"{name} v{version.version}: {'promoted to' if promoted else 'not promoted to'} @{reg.alias}: {reason}"
    log.info(message)
    if missing:
        log.warning("%s: missing artifacts (not logged): %s", name, ", ".join(missing))
    return RegistrationResult(name, str(version.version), promoted, reason, f"models:/{name}/{version.version}",
                              run_id, digest, created=True, missing_artifacts=missing,
                              champion_version=str(holder.version) if holder else None)


@dataclass
class LoadedModel:
    model: torch.nn.Module  # the exported module: x [N, 3, S, S] float32 -> [N, K+1]
    preprocess: Preprocess
    pipeline: str
    name: str
    version: str
    run_id: str
    model_uri: str
    metadata: dict
    tags: dict


def load_model(cfg: Config, name: str | None = None, *, alias: str | None = None,
               version: str | None = None) -> LoadedModel:
    """A registered version (by alias, default `registry.alias`, or by version) on the CPU,
    with its preprocessing and pipeline from the model's metadata."""
    import mlflow

    from pap_severity.tracking import tracking_uri

    uri = tracking_uri(cfg)
    client = _client(cfg)
    name = name or cfg.registry.model_name
    if version is not None:
        mv = client.get_model_version(name, str(version))
        model_uri = f"models:/{name}/{mv.version}"
    else:
        alias = alias or cfg.registry.alias
        mv = _champion(client, name, alias)
        if mv is None:
            raise LookupError(f"no version of {name!r} holds @{alias} in {uri}; run `pap-severity register`")
        model_uri = f"models:/{name}@{alias}"
    with tempfile.TemporaryDirectory() as tmp:
        # The exact version found (the alias could move meanwhile).
        # MLflow 3.17 ignores registry_uri= for a models:/ URI: resolve the version's folder first.
        source = client.get_model_version_download_uri(name, str(mv.version))
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri)
        model = mlflow.pytorch.load_model(local)
        info = mlflow.models.Model.load(local)
    devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
    if devices - {"cpu"}:
        raise RuntimeError(f"{model_uri} holds weights on {sorted(devices)}; log it from a CPU copy "
                           "(tracking.Tracker.log_model does)")
    meta = dict(info.metadata or {})
    if "preprocess" not in meta or "pipeline" not in meta:
        raise ValueError(f"{model_uri} has no preprocessing/pipeline metadata; log it with tracking.Tracker.log_model")
    return LoadedModel(model=model, preprocess=Preprocess.from_json(json.dumps(meta["preprocess"])),
                       pipeline=str(meta["pipeline"]), name=name, version=str(mv.version), run_id=mv.run_id,
                       model_uri=model_uri, metadata=meta, tags=dict(mv.tags))


def load_champion(cfg: Config, name: str | None = None) -> tuple[torch.nn.Module, dict]:
    """`models:/<registry.model_name>@<registry.alias>` on the CPU, and its metadata: preprocess
    (a transforms.Preprocess), pipeline, arch, name, version, run_id, model_uri, score_column, tags."""
    loaded = load_model(cfg, name)
    meta = {**loaded.metadata, "preprocess": loaded.preprocess, "pipeline": loaded.pipeline,
            "name": loaded.name, "version": loaded.version, "run_id": loaded.run_id,
            "model_uri": loaded.model_uri, "tags": loaded.tags}
    return loaded.model, meta


def reference_io(cfg: Config, run_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The inputs and outputs recorded when the version of `run_id` was registered."""
    import mlflow

    from pap_severity.tracking import tracking_uri

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REFERENCE_ARTIFACT,
                                                   dst_path=tmp, tracking_uri=tracking_uri(cfg))
        with np.load(path, allow_pickle=False) as data:
            return data["inputs"].copy(), data["outputs"].copy()


__all__ = [
    "EXPLAIN_FILES",
    "LoadedModel",
    "REFERENCE_ARTIFACT",
    "RegistrationResult",
    "content_hash",
    "explain_artifacts",
    "load_champion",
    "load_model",
    "model_name_for",
    "promotion_decision",
    "reference_io",
    "register",
    "scalar_metrics",
]
