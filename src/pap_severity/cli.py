"""The `pap-severity` command line: parse, call a library function, print.

Every command is also a DVC stage; `dvc.yaml` calls these and tests call the
same library functions.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pap_severity import __version__
from pap_severity.config import Config, ConfigError, check_pipeline, load_config

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Herlev data: fetch, synth, manifest, validate, split.", no_args_is_help=True)
app.add_typer(data_app, name="data")
bento_app = typer.Typer(help="The BentoML service: import the champion, build the bento.", no_args_is_help=True)
app.add_typer(bento_app, name="bento")

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read settings from")]
DEFAULT_PARAMS = Path("params.yaml")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
log = logging.getLogger(__name__)


# Options of every command -----------------------------------------------------------------


def configure_logging(verbose: int = 0, quiet: bool = False) -> None:
    """Log lines on stderr: pap-severity's from info up (debug with -v, warnings only with -q),
    other libraries' from warning up (everything with -vv). -q also turns progress bars off."""
    logging.basicConfig(format=LOG_FORMAT, level=logging.DEBUG if verbose > 1 else logging.WARNING)
    logging.getLogger("pap_severity").setLevel(
        logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    if quiet:
        from pap_severity.progress import ENV

        os.environ[ENV] = "1"  # read by every bar of the package (pap_severity.progress)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"pap-severity {__version__}")
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_print_version, is_eager=True,
                                                    help="print the version and exit")] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="debug lines of pap-severity; -vv: of every library too")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="only warnings and errors, no progress bars")] = False,
) -> None:
    if verbose and quiet:
        typer.echo("error: -q and -v contradict each other; give one", err=True)
        raise typer.Exit(2)
    configure_logging(verbose, quiet)


# Settings ----------------------------------------------------------------------------------


def in_project(uri: str, root: Path) -> str:
    """A relative MLflow store (sqlite:///mlflow.db, ./mlruns) made absolute under the project root;
    any other URI unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path, _, query = uri[len(prefix):].partition("?")
        if path and path != ":memory:" and not Path(path).is_absolute():
            return prefix + (root / path).as_posix() + (f"?{query}" if query else "")
        return uri
    if "://" not in uri and not uri.startswith("file:") and not Path(uri).is_absolute():
        return (root / uri).as_posix()
    return uri


def project_store(cfg: Config) -> Config:
    """cfg, with its MLflow store in the project when DVC runs the stage in a temporary copy.

    A queued (`dvc exp run --queue`, `--run-all`) or `--temp` experiment runs in a copy under
    .dvc/tmp/exps without the git-ignored mlflow.db: a relative store there would be thrown away
    with the copy. DVC names the project in DVC_ROOT; MLFLOW_TRACKING_URI, when set, wins anyway."""
    root = os.environ.get("DVC_ROOT")
    if not root or os.environ.get("MLFLOW_TRACKING_URI") or Path(root).resolve() == Path.cwd().resolve():
        return cfg
    uri = in_project(cfg.mlflow.tracking_uri, Path(root).resolve())
    if uri == cfg.mlflow.tracking_uri:
        return cfg
    log.info("MLflow store: %s (the project's; DVC runs this stage in a temporary copy)", uri)
    return cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": uri})})


def _config(params: Path) -> Config:
    """params.yaml when present; the built-in defaults only when the default file is absent."""
    if params == DEFAULT_PARAMS and not params.exists():
        log.debug("settings: the built-in defaults (no %s here)", params)
        cfg = Config()
    else:
        log.debug("settings: %s", params)
        cfg = load_config(params)
    return project_store(cfg)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# Errors ------------------------------------------------------------------------------------

# Libraries whose errors say what went wrong but come with a traceback: their package -> what to check.
LIBRARY_HINTS = {
    "mlflow": "check the MLflow store (MLFLOW_TRACKING_URI, else mlflow.tracking_uri in params.yaml)",
    "sqlalchemy": "check the database URL and that its server runs",
    "dvc": "run it from the project root (a git + DVC repository); `dvc doctor` shows DVC's setup",
}
LIBRARY_NAMES = {"mlflow": "MLflow", "sqlalchemy": "database", "dvc": "DVC"}
_REASON = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def library_error(exc: BaseException) -> str | None:
    """One line for an MLflow, SQLAlchemy or DVC error (what failed, where, what to check); None for others."""
    package = next((cls.__module__.split(".")[0] for cls in type(exc).__mro__
                    if cls.__module__.split(".")[0] in LIBRARY_HINTS), None)
    if package is None:
        return None
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    message = lines[0] if lines else type(exc).__name__
    where = ""
    if package == "mlflow":
        from pap_severity.tracking import redact

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None and "mlflow" in sys.modules:
            uri = sys.modules["mlflow"].get_tracking_uri()
        where = f" ({redact(uri)})" if uri else ""
        reason = _REASON.search(text)
        if reason and ("Max retries exceeded" in text or "Failed to establish" in text):
            message = f"cannot reach the tracking server: {reason.group(1).strip()}"
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{LIBRARY_NAMES[package]}{where}: {message}; {LIBRARY_HINTS[package]}"


def _check_pipelines(names) -> None:
    """Every --pipeline value names a pipeline, before a command uses it (the error lists them)."""
    for name in [names] if isinstance(names, str) else names or []:
        check_pipeline(name)


def clean_errors(fn):
    """Turn the errors a user can fix into one line on stderr and exit code 2, not a traceback.

    That covers bad settings and inputs, an unknown pipeline name (checked for every command with
    a --pipeline option), and MLflow, database and DVC errors; -v adds the traceback to the log."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _check_pipelines(kwargs.get("pipeline"))
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except Exception as exc:
            line = library_error(exc)
            if line is None and not isinstance(exc, (ConfigError, ValueError, FileNotFoundError, LookupError,
                                                     RuntimeError)):
                raise
            log.debug("the error in full:", exc_info=True)
            typer.echo(f"error: {line or exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@data_app.command("synth")
@clean_errors
def data_synth(
    out: Annotated[Path, typer.Option(help="folder to write the synthetic set into")] = Path("data/synth"),
    per_class: Annotated[Optional[int], typer.Option(help="cells per class folder [params: synth.per_class]")] = None,
    size: Annotated[Optional[int], typer.Option(help="image side in pixels [params: synth.size]")] = None,
    seed: Annotated[Optional[int], typer.Option(help="random seed [params: synth.seed]")] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Write a synthetic set in the Herlev layout (images and -d.bmp masks)."""
    from pap_severity.data.synth import make_synthetic

    cfg = _config(params).synth
    paths = make_synthetic(
        out,
        per_class=per_class if per_class is not None else cfg.per_class,
        size=size if size is not None else cfg.size,
        seed=seed if seed is not None else cfg.seed,
    )
    typer.echo(f"wrote {len(paths)} synthetic cells (not Herlev data) to {out}")


@data_app.command("fetch")
@clean_errors
def data_fetch(
    zip_path: Annotated[Optional[Path], typer.Option("--zip", help="use this smear2005.zip instead of downloading")] = None,
    url: Annotated[Optional[str], typer.Option(help="download URL [params: data.url]")] = None,
    dest: Annotated[Optional[Path], typer.Option(help="folder for the zip and its contents [params: data.download_dir]")] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Download the official smear2005.zip, check it, and extract it."""
    from pap_severity.data.fetch import fetch

    cfg = _config(params).data
    root = fetch(url or cfg.url, dest or Path(cfg.download_dir), sha256=cfg.sha256, zip_path=zip_path)
    typer.echo(f"extracted Herlev to {root}")
    typer.echo(f"train on it: dvc exp run -S data.root={root.as_posix()}")


LISTED_FILES = 20  # bad files printed per problem; validation.json lists them all


@data_app.command("manifest")
@clean_errors
def data_manifest(
    root: Annotated[Path, typer.Argument(help="folder holding the class folders, at any depth")],
    out: Annotated[Path, typer.Option(help="CSV to write")] = Path("data/manifest.csv"),
) -> None:
    """Describe every cell under ROOT in one CSV row."""
    from pap_severity.data.manifest import build_manifest, write_manifest

    df = build_manifest(root)
    write_manifest(df, out)
    counts = df["class_name"].value_counts().sort_index()
    typer.echo(f"{len(df)} cells ({df['source'].iloc[0]}) -> {out}")
    for name, n in counts.items():
        typer.echo(f"  {name:<22} {n}")
    problems = [f"{path}: {error}" for row in df.itertuples()
                for path, error in ((row.path, row.image_error), (row.mask_path, row.mask_error)) if error]
    for line in problems[:LISTED_FILES]:
        typer.echo(f"warning: {line}", err=True)
    if problems:
        more = f", {len(problems) - LISTED_FILES} more not shown" if len(problems) > LISTED_FILES else ""
        typer.echo(f"warning: {len(problems)} unreadable file(s) recorded in the manifest{more}; "
                   f"`pap-severity data validate {out}` names them all", err=True)


@data_app.command("split")
@clean_errors
def data_split(
    manifest: Annotated[Path, typer.Argument(help="manifest CSV")] = Path("data/manifest.csv"),
    out: Annotated[Path, typer.Option(help="CSV to write")] = Path("data/splits.csv"),
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Stratified, seeded k folds plus a held-out test part; duplicates stay together."""
    from pap_severity.data.manifest import read_manifest
    from pap_severity.data.splits import make_splits, write_splits

    cfg = _config(params)
    splits = make_splits(read_manifest(manifest), cfg.split)
    write_splits(splits, out)
    repeats = splits["repeat"].nunique()
    typer.echo(f"{splits['path'].nunique()} cells, {repeats} repeat(s) -> {out}")
    for (repeat, part, fold), n in splits.groupby(["repeat", "part", "fold"]).size().items():
        if part == "cv" or repeat == 0:  # the test part is the same in every repeat
            typer.echo(f"  {f'repeat {repeat} ' if repeats > 1 else ''}{part:<4} fold {fold:>2}: {n}")


@data_app.command("validate")
@clean_errors
def data_validate(
    source: Annotated[Path, typer.Argument(help="a data folder, or a manifest CSV")],
    splits: Annotated[Optional[Path], typer.Option(help="splits CSV to check for disjoint parts")] = None,
    out: Annotated[Optional[Path], typer.Option(help="folder for validation.json and the GX data docs")] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Run the Great Expectations suite; exit 1 and name the files when it fails."""
    from pap_severity.data.manifest import build_manifest, read_manifest
    from pap_severity.data.splits import read_splits
    from pap_severity.validation import validate_manifest

    cfg = _config(params)
    manifest = read_manifest(source) if source.is_file() else build_manifest(source)
    report = validate_manifest(
        manifest, cfg.data, splits=read_splits(splits) if splits else None, out_dir=out
    )
    typer.echo(f"{len(manifest)} cells ({manifest['source'].iloc[0]})")
    for name, n in sorted(report.class_counts.items()):
        typer.echo(f"  {name:<22} {n}")
    for failure in report.failures:
        typer.echo(f"FAILED: {failure.expectation}: {failure.detail}", err=True)
        for f in failure.files[:LISTED_FILES]:
            typer.echo(f"  {f}", err=True)
        if len(failure.files) > LISTED_FILES:
            where = f"full list in {report.result_path}" if report.result_path else "--out DIR writes the full list"
            typer.echo(f"  ... and {len(failure.files) - LISTED_FILES} more; {where}", err=True)
    if report.result_path:
        typer.echo(f"result: {report.result_path}")
    if report.data_docs:
        typer.echo(f"data docs: {report.data_docs}")
    if not report.success:
        typer.echo(f"validation failed: {len(report.failures)} expectation(s) not met", err=True)
        raise typer.Exit(1)
    typer.echo("validation passed")


PipelineOpt = Annotated[str, typer.Option("--pipeline", "-p", help="classification, regression, combined, corn or sord")]
PipelinesOpt = Annotated[Optional[list[str]], typer.Option(
    "--pipeline", "-p", help="classification, regression, combined, corn or sord; repeat it for several "
                             "[default: every pipeline of train.pipelines]")]
NoTrackOpt = Annotated[bool, typer.Option("--no-track", help="do not log to MLflow")]
BestParamsOpt = Annotated[Optional[Path], typer.Option(
    help="tuned settings to apply; {pipeline} in the path stands for each pipeline's name "
         "(tuning/{pipeline}/best_params.json)")]


def each_pipeline(cfg: Config, pipeline: list[str] | None,
                  best_params: Path | None = None) -> list[tuple[str, Path | None]]:
    """The pipelines a command runs, one after the other in this process (--pipeline, else train.pipelines),
    each with its tuned-settings file. One process for all of them: a DVC stage pays its imports once."""
    names = list(dict.fromkeys(pipeline)) if pipeline else list(cfg.train.pipelines)
    if best_params is not None and len(names) > 1 and "{pipeline}" not in str(best_params):
        raise ValueError(f"--best-params {best_params} is one file for {len(names)} pipelines; put {{pipeline}} "
                         "in its path (tuning/{pipeline}/best_params.json), or give one --pipeline")
    return [(name, None if best_params is None else Path(str(best_params).replace("{pipeline}", name)))
            for name in names]


@app.command("tune")
@clean_errors
def tune(
    pipeline: PipelinesOpt = None,
    storage: Annotated[Optional[str], typer.Option(help="Optuna storage shared by workers, e.g. postgresql://user@host/db [params: tune.storage]")] = None,
    study_name: Annotated[Optional[str], typer.Option(help="join this study instead of the one named after the settings")] = None,
    n_trials: Annotated[Optional[int], typer.Option(help="finished trials the study aims at [params: tune.n_trials]")] = None,
    timeout: Annotated[Optional[float], typer.Option(help="seconds this worker may run [params: tune.timeout]")] = None,
    no_track: NoTrackOpt = False,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Tune the settings in tune.space of each pipeline on the cv folds; one worker of each pipeline's Optuna study."""
    from pap_severity import stages
    from pap_severity.tuning.space import BEST_FILE, format_params

    cfg = _config(params)
    pipelines = each_pipeline(cfg, pipeline)
    if study_name is not None and len(pipelines) > 1:
        raise ValueError(f"--study-name {study_name} names one study for {len(pipelines)} pipelines; give one --pipeline")
    for name, _ in pipelines:
        best = stages.tune(cfg, name, storage=storage, study_name=study_name, n_trials=n_trials, timeout=timeout,
                           track=not no_track)
        typer.echo(f"{name}: best mean validation {best['metric']} {best['value']:.3f} with "
                   f"{format_params(best['params'])} -> {stages.TUNING / name / BEST_FILE}")


@app.command("train")
@clean_errors
def train(
    pipeline: PipelinesOpt = None,
    best_params: BestParamsOpt = None,
    resume: Annotated[bool, typer.Option(help="continue an interrupted run from its last epoch checkpoint")] = False,
    no_track: NoTrackOpt = False,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Cross-validate each pipeline: a model per fold, predictions on validation and test."""
    from pap_severity import stages

    cfg = _config(params)
    for name, tuned in each_pipeline(cfg, pipeline, best_params):
        predictions = stages.train(cfg, name, best_params=tuned, resume=resume, track=not no_track)
        accuracy = (predictions["pred"] == predictions["severity"]).groupby(
            [predictions["part"], predictions["fold"]]).mean().groupby("part").mean()
        typer.echo(f"{name}: mean accuracy over folds " + ", ".join(f"{p} {a:.3f}" for p, a in accuracy.items()))


@app.command("evaluate")
@clean_errors
def evaluate(pipeline: PipelinesOpt = None, best_params: BestParamsOpt = None, no_track: NoTrackOpt = False,
             params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Metrics (mean and std over folds) and figures of each pipeline."""
    from pap_severity import stages

    cfg = _config(params)
    for name, tuned in each_pipeline(cfg, pipeline, best_params):
        result = stages.evaluate(cfg, name, best_params=tuned, track=not no_track)
        m = result["metrics"]
        shown = ", ".join(f"{k} {_fmt(m[k]['mean'])} ± {_fmt(m[k]['std'])}" for k in ("accuracy", "mean_auc", "mse"))
        typer.echo(f"{name}, test part, {m['data_source']} data: {shown} -> {result['metrics_path']}")


@app.command("compare")
@clean_errors
def compare(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Every pipeline side by side and paired against compare.reference: reports/comparison.md and .json, figures."""
    from pap_severity import stages

    result = stages.compare(_config(params))
    typer.echo((stages.COMPARISON.with_suffix(".md")).read_text())
    for note in result["notes"]:
        typer.echo(f"note: {note}", err=True)


@app.command("train-final")
@clean_errors
def train_final(pipeline: PipelinesOpt = None, best_params: BestParamsOpt = None,
                params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Train each pipeline on every cv cell with its tuned settings; measure it on the test part."""
    from pap_severity import stages

    cfg = _config(params)
    for name, tuned in each_pipeline(cfg, pipeline, best_params):
        m = stages.train_final(cfg, name, best_params=tuned)
        typer.echo(f"{name} final model, test part ({m['n_test_cells']} cells, {m['data_source']} data): "
                   f"accuracy {_fmt(m['accuracy'])}, mean AUC {_fmt(m['mean_auc'])}, score MSE {_fmt(m['mse'])}")


@app.command("sweep")
@clean_errors
def sweep(
    lambdas: Annotated[str, typer.Option(help="comma-separated lambda values")] = "0,0.25,0.5,1,2,4",
    best_params: BestParamsOpt = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """The combined pipeline cross-validated once per lambda on the same splits: reports/sweep/lambda.*"""
    from pap_severity import stages

    try:
        values = tuple(float(v) for v in lambdas.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--lambdas must be numbers separated by commas, got {lambdas!r}") from None
    cfg = _config(params)
    ((_, tuned),) = each_pipeline(cfg, ["combined"], best_params)  # {pipeline} in --best-params: combined
    stages.sweep(cfg, values, best_params=tuned)
    typer.echo(Path("reports/sweep/lambda.md").read_text())


@app.command("ensemble")
@clean_errors
def ensemble(pipeline: PipelinesOpt = None, best_params: BestParamsOpt = None,
             params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Each pipeline's served model (fold ensemble or final model) calibrated, with its referral threshold; every candidate on the test part."""
    from pap_severity import stages

    cfg = _config(params)
    for pipeline_name, tuned in each_pipeline(cfg, pipeline, best_params):
        m = stages.ensemble(cfg, pipeline_name, best_params=tuned)["metrics"]
        for name, row in m["rows"].items():
            accuracy = row["accuracy"]["mean"] if isinstance(row["accuracy"], dict) else row["accuracy"]
            ece = row["ece_calibrated"]["mean"] if isinstance(row["ece_calibrated"], dict) else row["ece_calibrated"]
            served = " (served)" if name == m["served"] else ""
            typer.echo(f"{pipeline_name} {name:<13} test accuracy {_fmt(accuracy)}, ECE after temperature "
                       f"{_fmt(ece)}{served}")


@app.command("headline")
@clean_errors
def headline(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """metrics/headline.json: a few numbers of each pipeline's served model, the metric `dvc exp show` compares."""
    from pap_severity import stages

    for name, values in stages.headline(_config(params)).items():
        typer.echo(f"{name:<15} " + ", ".join(f"{key} {_fmt(value)}" for key, value in values.items()))
    typer.echo(f"-> {stages.HEADLINE}")


@app.command("explain")
@clean_errors
def explain(pipeline: PipelineOpt, params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """Integrated Gradients report of the served model (fold ensemble or final model) on the test part, with At_N / At_C per class."""
    from pap_severity import stages
    from pap_severity.explain import GALLERY_FILE, REPORT_FILE

    stages.explain(_config(params), pipeline)
    typer.echo(f"report: {stages.EXPLAIN / pipeline / REPORT_FILE}; misclassified cells: "
               f"{stages.EXPLAIN / pipeline / GALLERY_FILE}")


@app.command("register")
@clean_errors
def register(
    pipeline: Annotated[Optional[list[str]], typer.Option("--pipeline", "-p", help="only these pipelines [default: train.pipelines]")] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Register each pipeline's served model (fold ensemble or final model, models/ensemble/<pipeline>.json) in the MLflow Model Registry; the promotion rule, on its test metrics, moves @champion."""
    from pap_severity import stages

    cfg = _config(params)
    alias = cfg.registry.alias
    for r in stages.register(cfg, tuple(pipeline) if pipeline else None):
        if not r.created:
            holder = f"@{alias} is v{r.champion_version}" if r.champion_version else f"no version holds @{alias}"
            typer.echo(f"{r.name} v{r.version}: already registered, nothing added ({holder})")
        elif r.moved_alias:
            typer.echo(f"{r.name} v{r.version}: @{alias} ({r.reason})")
        else:
            typer.echo(f"{r.name} v{r.version}: not {alias} ({r.reason})")
        if r.missing_artifacts:
            typer.echo(f"  missing artifacts: {', '.join(map(str, r.missing_artifacts))}")


@app.command("predict")
@clean_errors
def predict(
    paths: Annotated[list[Path], typer.Argument(help="cell images, or folders searched at any depth")],
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV to write: one row per cell")],
    model_uri: Annotated[Optional[str], typer.Option(
        "--model-uri", help="models:/<name>/<version> or models:/<name>@<alias> "
                            "(default: the champion, models:/<registry.model_name>@<registry.alias>)")] = None,
    mask_suffix: Annotated[str, typer.Option(
        "--mask-suffix", help="a file <cell stem><suffix>.<image suffix> is that cell's mask, never a cell")] = "-d",
    explain: Annotated[bool, typer.Option(
        "--explain", help="also write IG heat maps (<out>_heatmaps/) and At_N / At_C where a mask exists")] = False,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Batch prediction with no server: the champion's (or --model-uri's) answers for images or folders, the numbers /predict gives."""
    from pap_severity.batch_predict import predict_paths

    cfg = _config(params)
    table = predict_paths(cfg, paths, out, model_uri=model_uri, mask_suffix=mask_suffix, explain=explain,
                          device=cfg.serve.device)
    refused = int(table["error"].notna().sum())
    referred = int(table["refer"].fillna(False).astype(bool).sum()) if "refer" in table else 0
    typer.echo(f"wrote {out}: {len(table) - refused} cells, {referred} referred to a cytologist"
               + (f", {refused} refused (see the error column)" if refused else ""))


@app.command("report")
@clean_errors
def report(params: ParamsOpt = DEFAULT_PARAMS) -> None:
    """reports/index.html: one page linking everything the pipeline produced."""
    from pap_severity import stages

    typer.echo(f"wrote {stages.report(_config(params))}")


@bento_app.command("import")
@clean_errors
def bento_import(
    version: Annotated[Optional[str], typer.Option(help="a registered version instead of the alias")] = None,
    alias: Annotated[Optional[str], typer.Option(help="registry alias [params: registry.alias]")] = None,
    params: ParamsOpt = DEFAULT_PARAMS,
) -> None:
    """Copy models:/<registry.model_name>@<alias> into the BentoML model store (BENTOML_HOME, else the project's bentoml_home/)."""
    from pap_severity.bento_build import import_champion

    tag = import_champion(_config(params), alias=alias, version=version)
    typer.echo(f"imported {tag}; serve it: cd bento && bentoml serve")


@bento_app.command("wheel")
@clean_errors
def bento_wheel() -> None:
    """Build the package wheel into bento/wheels (offline), for `bentoml build`."""
    from pap_severity.bento_build import build_wheel

    typer.echo(f"wrote {build_wheel()}")


@bento_app.command("build")
@clean_errors
def bento_build(
    record: Annotated[Optional[Path], typer.Option(help="also write the bento tag to this JSON file")] = None,
) -> None:
    """Build the wheel, then `bentoml build` bento/ (offline); import the model first."""
    from pap_severity.bento_build import bento_record, build_bento
    from pap_severity.files import write_json

    tag = build_bento()
    if record is not None:
        write_json(bento_record(tag), record)
    typer.echo(f"built bento {tag}; serve it: cd bento && bentoml serve")


def main() -> None:  # pragma: no cover - the console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
