"""The MLflow Model Registry: served models, the promotion rule, the `champion` alias.

What is registered is a pipeline's served model (stages.served_bundle of
models/ensemble/<pipeline>.json): the fold ensemble (or the final model) with its dihedral TTA,
its temperature and its referral rule, as ONE nn.Module (pap_severity.ensemble.FoldEnsemble). Its
MLflow model metadata (`served_metadata`) carries the output columns and `ensemble` {members,
member_arch, tta, temperature, referral {measure, threshold, max_rate}, variant}, so the server
and `pap-severity predict` rebuild it and decide referral; the version's tags repeat them for the
UI. A bare model (a bundle without a served spec, as older versions were) registers and serves
too, without uncertainty.

- Names: the pipeline `registry.pipeline` (combined) is registered as
  `registry.model_name` ("pap-severity"); every other pipeline as
  `<model_name>-<pipeline>` ("pap-severity-classification", ...), so the UI compares them.
- Each registration is one MLflow run, `register-<pipeline>`, in the `mlflow.experiment`
  experiment, holding: the settings as params; the served model's test metrics (its row of
  metrics/ensemble/<pipeline>.json) as `test_<metric>`; the files given (figures, the IG report: report.html,
  attributions.csv, summary.json), under their project-relative folder, with the missing
  ones named in the tag `missing_artifacts`; `reference/reference_io.npz` (inputs and the
  outputs the model gave them, to check any later load); and the model itself, logged by
  `tracking.Tracker.log_model` in the pt2 format (torch.export) with the preprocessing
  and the pipeline in its metadata and in `extra_files/preprocess.json` and `bundle.json`.
- The model version carries the tags `content_hash` (sha256 of the pipeline, the
  architecture, the preprocessing and every weight), `pipeline`, `data_source`,
  `git_commit`, `test_<metric>` for the headline test metrics, `promotion` (promoted |
  not promoted), `promotion_reason` and `promotion_figures` (JSON: per metric of the rule,
  this version's value, the champion's, the margin, how much worse, and the verdict).
- Promotion rule: a new version takes the alias `registry.alias` ("champion") only if,
  on every metric of `registry.metrics` (default accuracy, mean AUC and score MSE), its
  test value is not worse than the current champion's by more than the metric's margin
  (`registry.margin`: one number, or one per metric; worse = lower, or higher for mse,
  mae, macro_mae). One number on a small test part decides nothing alone: a challenger
  that gains one cell of accuracy while losing AUC and MSE stays out. A missing or NaN
  metric never beats a champion that has it; a metric neither has is not judged.
  Otherwise the version is registered without the alias and the reason is in its tags
  and in the result.
- Idempotent: a model whose content hash is already registered under the name adds no
  run and no version; the existing version is returned (`created=False`). So re-running
  the stage with nothing changed adds nothing.
- Concurrent registrations (two `pap-severity register` at once, on one machine or many):
  the idempotence check, the new version, the decision and the alias move happen under
  one lock of the store (`registration_lock`): a file lock beside a SQLite database (its
  processes share a machine), a PostgreSQL advisory lock when the tracking URI is a
  PostgreSQL database (any number of machines), or, for an MLflow server (http), an
  advisory lock in the PostgreSQL database `registry.lock` names. So each content hash
  gets one version, the second of two identical registrations returns the first one's
  version (`created=False`), two different models are compared in turn, and a brand-new
  store is created by one process only. Without a lock (an MLflow server and no
  `registry.lock`) two checks still hold: a version whose content hash already has a lower
  version deletes itself and its run (so one version per hash remains), and a process
  reports the alias as moved only if the alias holds its version when read back; but two
  different challengers may then each be compared with the champion they saw, and the
  later alias write wins.
- `load_champion` (the user's way in, e.g. from a notebook) loads
  `models:/pap-severity@champion` on a CPU-only machine: the model is exported from a CPU
  copy (Tracker.log_model), so every weight of the pt2 archive is a CPU tensor whatever
  device trained it. (A pt2 model cannot be moved between devices after loading;
  `mlflow.pytorch.load_model` ignores map_location for it.) Checked: a model trained on an
  H100 (AMP, channels_last) loads here on a CPU-only machine and gives the CPU outputs of
  the trained weights exactly; a pt2 exported from the CUDA model itself does not even load
  without a GPU ("No CUDA GPUs are available").
- The loaded model is a torch.export module in inference mode (BatchNorm uses its running
  statistics): call it, under torch.no_grad(), but never `.eval()`/`.train()` (torch
  raises "Calling eval() is not supported yet"). Input: preprocessed cells
  [N, 3, S, S] float32 (any N); output: a served model's ensemble.COLUMNS (metadata `columns`;
  decode with `ensemble.decode(out, meta["pipeline"])`), or an older bare model's [N, K+1]
  (logits, then the score: decode with `pipelines.get_pipeline(meta["pipeline"]).decode`).
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pap_severity.checkpoints import ModelBundle, load_bundle
from pap_severity.config import Config, RegistryConfig
from pap_severity.evaluation import HEADLINE, LOWER_IS_BETTER, STOPPING_METRICS
from pap_severity.explain.files import EXPLAIN_FILES
from pap_severity.files import json_ready
from pap_severity.transforms import Preprocess, white_input

log = logging.getLogger(__name__)

REFERENCE_ARTIFACT = "reference/reference_io.npz"
# One lock for all registrations on a store: creating a fresh store is part of what it guards.
LOCK_NAME = "pap-severity/register"


@dataclass
class RegistrationResult:
    name: str
    version: str
    promoted: bool  # this version holds the alias (after this call)
    reason: str
    model_uri: str  # models:/<name>/<version>
    run_id: str
    content_hash: str
    created: bool = True  # False: the same model was registered before, nothing was added
    missing_artifacts: list[str] = field(default_factory=list)
    champion_version: str | None = None  # the version holding the alias after this call
    moved_alias: bool = False  # this call moved the alias to this version
    figures: dict = field(default_factory=dict)  # the promotion rule's numbers (tag promotion_figures)


def model_name_for(cfg: Config, pipeline: str) -> str:
    """`registry.model_name` for `registry.pipeline`, `<model_name>-<pipeline>` for the others."""
    base = cfg.registry.model_name
    return base if pipeline == cfg.registry.pipeline else f"{base}-{pipeline}"


def explain_artifacts(pipeline: str, reports: str | Path = "reports") -> list[Path]:
    """The IG report files the explain stage writes for a pipeline (which may not exist yet)."""
    return [Path(reports) / "explain" / pipeline / name for name in EXPLAIN_FILES]


def served_metadata(bundle: ModelBundle) -> dict:
    """What a served model (stages.served_bundle: a fold ensemble, or the final model, with TTA, a
    temperature and a referral rule) adds to the MLflow model's metadata, so that whoever loads it
    (the server, `pap-severity predict`) rebuilds and reads it and decides referral: the output
    columns, and `ensemble` {members, member_arch, tta, temperature, referral {measure,
    threshold, max_rate}, variant}. {} for a bare model (no `served` spec in its meta)."""
    from pap_severity.ensemble import COLUMNS

    spec = (bundle.meta or {}).get("served")
    if not spec:
        return {}
    return {
        "output": f"one float32 tensor [N, {len(COLUMNS)}]: {', '.join(COLUMNS)} (pap_severity.ensemble)",
        "columns": list(COLUMNS),
        "ensemble": {"members": len(spec["members"]), "member_arch": spec["arch"], "tta": spec["tta"],
                     "temperature": float(spec["temperature"]), "referral": dict(spec["referral"]),
                     "variant": spec["variant"]},
    }


def content_hash(bundle: ModelBundle) -> str:
    """sha256 of what the model computes: pipeline, architecture, preprocessing, weights, and for a
    served model its poses and referral rule (neither is a weight)."""
    h = hashlib.sha256()
    served = served_metadata(bundle).get("ensemble")
    h.update(json.dumps({"pipeline": bundle.pipeline.name, "arch": bundle.arch,
                         "preprocess": json.loads(bundle.preprocess.to_json()),
                         **({"served": served} if served else {})}, sort_keys=True).encode())
    for key, tensor in sorted(bundle.model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"\n{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The numeric metrics of a dict: plain numbers, or the `mean` of {mean, std, per_fold}; a dict
    of numbers (accuracy_at_coverage {0.8: ..}) gives one metric each (accuracy_at_coverage_0.8)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict) and "mean" in value:
            value = value["mean"]
        elif isinstance(value, dict):
            out.update({f"{key}_{k}": v for k, v in scalar_metrics(value).items()})
            continue
        if value is None:
            value = float("nan")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            continue
        out[str(key)] = float(value)
    return out


def reference_inputs(pre: Preprocess, example: np.ndarray | None = None) -> np.ndarray:
    """Preprocessed inputs [N, 3, S, S] float32 to check a model's outputs on: the given ones,
    else a white cell and seeded noise. Two rows at least keep the batch dimension dynamic
    in the export. The registry records the outputs for these; the server compares the
    model it rebuilds with the exported one on them."""
    if example is not None:
        x = np.ascontiguousarray(example, dtype=np.float32)
        return np.concatenate([x, x])[:2] if x.shape[0] < 2 else x
    white = white_input(pre)[None]
    noise = torch.randn(1, *white.shape[1:], generator=torch.Generator().manual_seed(0))
    return torch.cat([white, noise]).numpy().astype(np.float32)


# --------------------------------------------------------------------------------------
# The promotion rule
# --------------------------------------------------------------------------------------


def promotion_decision(metric: str, new: float | None, champion: float | None, margin: float,
                       champion_version: str | None = None) -> tuple[bool, str]:
    """(acceptable?, reason) for one metric: not worse than the champion by more than margin."""
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


def margin_of(reg: RegistryConfig, metric: str) -> float:
    """The margin of one metric of the rule (registry.margin: one number, or one per metric)."""
    return float(reg.margin.get(metric, 0.0)) if isinstance(reg.margin, dict) else float(reg.margin)


def check_rule(reg: RegistryConfig) -> None:
    """registry.metrics must be metrics the final models are measured on."""
    unknown = [m for m in reg.metrics if m not in STOPPING_METRICS]
    if unknown:
        raise ValueError(f"registry.metrics: unknown metric(s) {unknown}; choose from {sorted(STOPPING_METRICS)}")


def promotion_rule(reg: RegistryConfig, new: dict[str, float], champion: dict[str, float] | None,
                   champion_version: str | None) -> tuple[bool, str, dict]:
    """(promote?, reason, figures): promote when no metric of registry.metrics is worse than the
    champion's beyond its margin (promotion_decision, metric by metric)."""
    if champion_version is None:
        return True, "no champion yet", {"champion_version": None, "metrics": {}}
    champion = champion or {}
    figures: dict = {"champion_version": champion_version, "metrics": {}}
    failed, parts = [], []
    for metric in reg.metrics:
        value, champ, margin = new.get(metric), champion.get(metric), margin_of(reg, metric)
        ok, why = promotion_decision(metric, value, champ, margin, champion_version)
        finite = value is not None and math.isfinite(value) and champ is not None and math.isfinite(champ)
        worse_by = ((value - champ) if metric in LOWER_IS_BETTER else (champ - value)) if finite else None
        figures["metrics"][metric] = {"value": value, "champion": champ, "margin": margin, "worse_by": worse_by,
                                      "lower_is_better": metric in LOWER_IS_BETTER, "ok": ok}
        parts.append(why)
        if not ok:
            failed.append(metric)
    if failed:
        head = f"worse than champion v{champion_version} beyond the margin on {', '.join(failed)}"
    else:
        head = f"not worse than champion v{champion_version} beyond the margin on {', '.join(reg.metrics)}"
    return not failed, f"{head}: {'; '.join(parts)}", figures


# --------------------------------------------------------------------------------------
# The store: client, lock, lookups
# --------------------------------------------------------------------------------------


def _client(cfg: Config):
    """A client of the config's store, for tracking and registry both. Explicit: the fluent
    registry URI (mlflow.set_registry_uri, MLFLOW_REGISTRY_URI) is never read nor set here."""
    import mlflow

    from pap_severity.tracking import tracking_uri

    uri = tracking_uri(cfg)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def _pg_advisory_lock(url: str, name: str) -> Iterator[None]:
    """A PostgreSQL session advisory lock (released by the server if the process dies)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    from pap_severity.tracking import redact

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    try:
        engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    except ModuleNotFoundError as exc:
        raise ValueError(f"{redact(url)}: no database driver ({exc}); SQLAlchemy reads a bare postgresql:// as "
                         "psycopg 3: spell the installed driver, postgresql+psycopg2://...") from None
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


@contextmanager
def registration_lock(cfg: Config) -> Iterator[str]:
    """Hold the store's registration lock (see the module docstring); yields what was locked, in words."""
    from filelock import FileLock

    from pap_severity.tracking import redact, tracking_uri

    uri = cfg.registry.lock or tracking_uri(cfg)
    scheme = uri.split(":", 1)[0].lower()
    if scheme.startswith("postgresql"):
        with _pg_advisory_lock(uri, LOCK_NAME):
            yield f"PostgreSQL advisory lock in {redact(uri)}"
        return
    if cfg.registry.lock:
        raise ValueError(f"registry.lock={redact(cfg.registry.lock)!r}: give a postgresql:// URL (or leave it empty)")
    if scheme == "sqlite":
        db = uri.removeprefix("sqlite:///").split("?", 1)[0]
        if db and db != ":memory:":
            path = Path(db).with_name(Path(db).name + ".lock")
            path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(path):
                yield f"file lock {path}"
            return
    log.info("no registration lock for the store %s; duplicates and lost alias moves are checked afterwards",
             redact(uri))
    yield "none"


def _champion(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such model, or no version with the alias
        return None


def _version_metrics(client, version, metrics) -> dict[str, float | None]:
    """A version's test metrics: its `test_<metric>` tags, else its run's metrics."""
    out: dict[str, float | None] = {}
    run_metrics = None
    for metric in metrics:
        tag = version.tags.get(f"test_{metric}")
        if tag is not None:
            try:
                out[metric] = float(tag)
            except ValueError:
                out[metric] = None
            continue
        if run_metrics is None:
            try:
                run_metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
            except Exception:  # the run was deleted
                run_metrics = {}
        out[metric] = run_metrics.get(f"test_{metric}")
    return out


def _versions_of(client, name: str, digest: str) -> list:
    found = client.search_model_versions(f"name = '{name}' and tags.content_hash = '{digest}'")
    return sorted(found, key=lambda v: int(v.version))


def find_version(cfg: Config, name: str | None = None, *, alias: str | None = None, version: str | None = None):
    """The registered ModelVersion of `name` holding `alias` (default registry.alias), or `version`;
    LookupError saying what to run when there is none."""
    from mlflow.exceptions import MlflowException

    from pap_severity.tracking import redact, tracking_uri

    client = _client(cfg)
    name = name or cfg.registry.model_name
    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias or cfg.registry.alias)
    except MlflowException as exc:
        wanted = f"version {version}" if version is not None else f"@{alias or cfg.registry.alias}"
        raise LookupError(f"no {name} {wanted} in the MLflow registry at {redact(tracking_uri(cfg))}: "
                          f"{exc.message}; run `pap-severity register` first") from None


@contextmanager
def downloaded_version(cfg: Config, name: str, version: str) -> Iterator[tuple[Path, dict]]:
    """The files of one registered version in a temporary folder, and its MLflow model metadata.

    Resolved by our client: a models:/ URI would be resolved by MLflow with the process-wide
    registry URI, ignoring registry_uri= (MLflow 3.17)."""
    import mlflow

    from pap_severity.tracking import tracking_uri

    client = _client(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        source = client.get_model_version_download_uri(name, str(version))
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp,
                                                         tracking_uri=tracking_uri(cfg)))
        yield local, dict(mlflow.models.Model.load(str(local)).metadata or {})


def load_champion(cfg: Config, name: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The model to use outside the server, e.g. in a notebook: `models:/<name>@<registry.alias>`
    on the CPU, and its metadata: preprocess (a transforms.Preprocess), pipeline, arch, name,
    version, run_id, model_uri, score_column, tags. See the module docstring for how to call it."""
    import mlflow

    name = name or cfg.registry.model_name
    mv = find_version(cfg, name)  # the exact version found: the alias could move meanwhile
    with downloaded_version(cfg, name, str(mv.version)) as (local, meta):
        model = mlflow.pytorch.load_model(str(local))
    model_uri = f"models:/{name}@{cfg.registry.alias}"
    devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
    if devices - {"cpu"}:
        raise RuntimeError(f"{model_uri} holds weights on {sorted(devices)}; log it from a CPU copy "
                           "(tracking.Tracker.log_model does)")
    if "preprocess" not in meta or "pipeline" not in meta:
        raise ValueError(f"{model_uri} has no preprocessing/pipeline metadata; log it with tracking.Tracker.log_model")
    return model, {**meta, "preprocess": Preprocess.from_json(json.dumps(meta["preprocess"])),
                   "pipeline": str(meta["pipeline"]), "name": name, "version": str(mv.version),
                   "run_id": mv.run_id, "model_uri": model_uri, "tags": dict(mv.tags)}


# --------------------------------------------------------------------------------------
# Registering
# --------------------------------------------------------------------------------------


def served_tags(served: dict) -> dict[str, str]:
    """Model-version tags of a served model's ensemble metadata (served_metadata), for the UI."""
    ens = served.get("ensemble")
    if not ens:
        return {}
    return {"served_variant": ens["variant"], "members": str(ens["members"]), "tta": ens["tta"],
            "temperature": f"{ens['temperature']:.6g}", "referral_measure": ens["referral"]["measure"],
            "referral_threshold": f"{ens['referral']['threshold']:.6g}"}


def version_description(bundle: ModelBundle, served: dict, data_source: str) -> str:
    """What a version is, in words, naming the data it was trained on."""
    from pap_severity.evaluation import DATA_SOURCES

    ens = served.get("ensemble")
    what = (f"{bundle.pipeline.name}: {ens['members']} x {ens['member_arch']} ({ens['variant']}), TTA {ens['tta']}, "
            f"temperature {ens['temperature']:.3g}, refers cells with {ens['referral']['measure']} > "
            f"{ens['referral']['threshold']:.3g}" if ens else f"{bundle.pipeline.name}: one {bundle.arch} model")
    return f"{what}. Trained and measured on {DATA_SOURCES.get(data_source, data_source)}."


def _artifact_dir(folder: Path) -> str:
    """Where a folder's files go in the run: its project-relative path (reports/explain/combined),
    or `files/<name>` for a folder outside the project."""
    try:
        rel = folder.resolve().relative_to(Path.cwd().resolve())
        return rel.as_posix() if rel.parts else "files"
    except ValueError:
        return f"files/{folder.name}" if folder.name else "files"


def _figures(version) -> dict:
    try:
        return json.loads(version.tags.get("promotion_figures", "{}"))
    except ValueError:
        return {}


def _already(client, cfg: Config, existing, digest: str) -> RegistrationResult:
    """The result for a model registered before: its version, as it was recorded; nothing added."""
    name = existing.name
    champion = _champion(client, name, cfg.registry.alias)
    held = champion is not None and str(champion.version) == str(existing.version)
    missing = [m.strip() for m in existing.tags.get("missing_artifacts", "").split(",") if m.strip()]
    log.info("already registered as %s v%s (content hash %s); nothing added", name, existing.version, digest[:12])
    # The reason recorded when the version was made, so a re-run reports exactly what the first did.
    return RegistrationResult(name, str(existing.version), held, existing.tags.get("promotion_reason", ""),
                              f"models:/{name}/{existing.version}", existing.run_id, digest, created=False,
                              missing_artifacts=missing, champion_version=str(champion.version) if champion else None,
                              figures=_figures(existing))


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
    reference outputs; params: extra params for the run. Safe to run in several processes
    at once (see the module docstring).
    """
    if not isinstance(bundle, ModelBundle):
        bundle, _ = load_bundle(bundle, map_location="cpu")
    if pipeline is not None and pipeline != bundle.pipeline.name:
        raise ValueError(f"the bundle holds a {bundle.pipeline.name!r} model, not {pipeline!r}")
    check_rule(cfg.registry)
    digest = content_hash(bundle)
    with registration_lock(cfg) as lock:
        log.debug("registering under %s", lock)
        return _register_locked(cfg, bundle, digest, metrics, artifacts=artifacts, data_source=data_source,
                                input_example=input_example, params=params)


def _register_locked(cfg: Config, bundle: ModelBundle, digest: str, metrics: dict, *, artifacts, data_source: str,
                     input_example, params) -> RegistrationResult:
    import mlflow
    from mlflow.entities import Metric

    from pap_severity.tracking import Tracker, flatten_params, log_params

    pipeline = bundle.pipeline.name
    reg = cfg.registry
    name = model_name_for(cfg, pipeline)
    tracker = Tracker(cfg, data_source)  # checks data_source; sets up the store and experiment
    client = _client(cfg)

    existing = _versions_of(client, name, digest)
    if existing:
        return _already(client, cfg, existing[0], digest)

    values = scalar_metrics(metrics)
    paths = [Path(p) for p in artifacts]
    missing = [str(p) for p in paths if not p.exists()]
    inputs = reference_inputs(bundle.preprocess, input_example)
    model = bundle.model.to("cpu").eval()
    with torch.no_grad():
        outputs = model(torch.from_numpy(inputs)).numpy()

    tags = {**tracker.tags, "pipeline": pipeline, "role": "final", "content_hash": digest,
            "registered_model": name}
    if missing:
        tags["missing_artifacts"] = ", ".join(missing)
    with mlflow.start_run(experiment_id=tracker.experiment_id, run_name=f"register-{pipeline}", tags=tags) as run:
        run_id = run.info.run_id
        log_params(client, run_id, {**flatten_params(cfg, pipeline),
                                    **{f"registry.{k}": v for k, v in reg.model_dump(mode="json").items()},
                                    **(params or {})})
        for path in paths:
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=_artifact_dir(path))
            elif path.is_file():
                mlflow.log_artifact(str(path), artifact_path=_artifact_dir(path.parent))
        with tempfile.TemporaryDirectory() as tmp:
            ref = Path(tmp) / Path(REFERENCE_ARTIFACT).name
            np.savez(ref, inputs=inputs, outputs=outputs)
            mlflow.log_artifact(str(ref), artifact_path=str(Path(REFERENCE_ARTIFACT).parent))
        served = served_metadata(bundle)
        model_uri = tracker.log_model(bundle, input_example=inputs, metadata=served, name=f"{pipeline}-served")
        # Logged after the model and with its id, so the Models tab shows the test metrics beside it.
        model_id = model_uri.removeprefix("models:/")
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(f"test_{k}", v, now, 0, model_id=model_id) for k, v in values.items()])

    version_tags = {
        "content_hash": digest,
        "pipeline": pipeline,
        "data_source": data_source,
        "git_commit": tracker.tags["git_commit"],
        "params_hash": tracker.tags["params_hash"],
        **{f"test_{k}": f"{values[k]:.6g}" for k in HEADLINE if k in values},
        **served_tags(served),
    }
    if missing:
        version_tags["missing_artifacts"] = ", ".join(missing)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        try:
            client.create_registered_model(
                name, tags={"pipeline": pipeline},
                description=f"pap-severity {pipeline} pipeline: Pap smear cell severity (5 classes) and score "
                            "1..5; each version's description names the data it was trained on",
            )
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process (no lock)
            client.get_registered_model(name)
    # What mlflow.register_model does for a logged model (models:/m-<id>), through our client.
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = str(client.create_model_version(name, source=model_uri, run_id=run_id, tags=version_tags,
                                              model_id=model_id,
                                              description=version_description(bundle, served, data_source)).version)

    # Under the lock nobody else registered meanwhile; without one, the lowest version of a hash stays.
    first = _versions_of(client, name, digest)[0]
    if str(first.version) != version:
        log.warning("%s: v%s has the same content as v%s, registered meanwhile; removing v%s", name, version,
                    first.version, version)
        client.delete_model_version(name, version)
        client.delete_run(run_id)
        return _already(client, cfg, first, digest)

    champion = _champion(client, name, reg.alias)
    champion_version = str(champion.version) if champion is not None else None
    champ_values = _version_metrics(client, champion, reg.metrics) if champion is not None else None
    promote, reason, figures = promotion_rule(reg, values, champ_values, champion_version)
    if promote:
        client.set_registered_model_alias(name, reg.alias, version)
    holder = _champion(client, name, reg.alias)
    held = holder is not None and str(holder.version) == version
    if promote and not held:  # only without a lock: another registration moved the alias after ours
        reason = (f"{reason}; but @{reg.alias} was moved to v{holder.version if holder else '?'} by another "
                  "registration at the same time")
    for key, value in {"promotion": "promoted" if held else "not promoted", "promotion_reason": reason,
                       "promotion_figures": json.dumps(json_ready(figures))}.items():
        client.set_model_version_tag(name, version, key, value)
    message = f"{name} v{version}: {'promoted to' if held else 'not promoted to'} @{reg.alias}: {reason}"
    log.info(message)
    if missing:
        log.warning("%s: missing artifacts (not logged): %s", name, ", ".join(missing))
    return RegistrationResult(name, version, held, reason, f"models:/{name}/{version}", run_id, digest,
                              created=True, missing_artifacts=missing,
                              champion_version=str(holder.version) if holder else None,
                              moved_alias=promote and held, figures=figures)


__all__ = [
    "EXPLAIN_FILES",
    "REFERENCE_ARTIFACT",
    "RegistrationResult",
    "check_rule",
    "content_hash",
    "downloaded_version",
    "explain_artifacts",
    "find_version",
    "load_champion",
    "margin_of",
    "model_name_for",
    "promotion_decision",
    "promotion_rule",
    "reference_inputs",
    "register",
    "registration_lock",
    "scalar_metrics",
    "served_metadata",
    "served_tags",
]
