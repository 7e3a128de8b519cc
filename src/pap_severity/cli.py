"""The `pap-severity` command line: parse, call a library function, print.

Every command is also a DVC stage; `dvc.yaml` calls these and tests call the
same library functions.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pap_severity.config import Config, ConfigError, load_config

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Herlev data: fetch, synth, manifest, validate, split.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ParamsOpt = Annotated[Path, typer.Option("--params", help="params.yaml to read settings from")]
DEFAULT_PARAMS = Path("params.yaml")


def _config(params: Path) -> Config:
    """params.yaml when present; the built-in defaults only when the default file is absent."""
    if params == DEFAULT_PARAMS and not params.exists():
        return Config()
    return load_config(params)


def clean_errors(fn):
    """Turn the errors a user can fix into one line on stderr and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as exc:
            typer.echo(f"error: {exc}", err=True)
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
    typer.echo(f"train on it: dvc repro -S data.root={root.as_posix()}")


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
    table = splits.groupby(["part", "fold"]).size()
    typer.echo(f"{len(splits)} cells -> {out}")
    for (part, fold), n in table.items():
        typer.echo(f"  {part:<4} fold {fold:>2}: {n}")


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
        for f in failure.files:
            typer.echo(f"  {f}", err=True)
    if report.result_path:
        typer.echo(f"result: {report.result_path}")
    if report.data_docs:
        typer.echo(f"data docs: {report.data_docs}")
    if not report.success:
        typer.echo(f"validation failed: {len(report.failures)} expectation(s) not met", err=True)
        raise typer.Exit(1)
    typer.echo("validation passed")


def main() -> None:  # pragma: no cover - the console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
