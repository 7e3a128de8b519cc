"""The Great Expectations suite over the manifest (GX Core 1.x API).

One suite, run by one checkpoint over the manifest as a pandas DataFrame. Derived
columns turn table-wide rules (a sha256 in two classes, a sha256 in two split
parts) into per-row values, so every failing expectation names its files through
`unexpected_index_column_names=["path"]`. Each expectation looks at its own column
only and skips the rows it does not apply to (their value is null), so a file
failing one check never hides another file's failure in another check.

    report = validate_manifest(manifest, cfg.data, splits, out_dir="reports/validation")
    report.success, report.failures, report.class_counts

With out_dir it writes `validation.json` (flat, DVC-metric friendly) and the GX data
docs under `data_docs/` (index.html).
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from pap_severity.config import DataConfig
from pap_severity.data.labels import CLASS_FOLDERS
from pap_severity.files import write_json

MANIFEST_COLUMNS = (
    "path",
    "mask_path",
    "class_name",
    "width",
    "height",
    "sha256",
    "mask_width",
    "mask_height",
    "nucleus_fraction",
    "source",
    "image_error",
    "mask_error",
)
SPLITS_COLUMNS = ("path", "sha256", "part", "fold")  # and `repeat`, 0 when absent (a single split)
SPLIT_PARTS = ("cv", "calib", "test")
RESULT_FILE = "validation.json"
DOCS_DIR = "data_docs"
SUITE_NAME = "manifest"
_SITE = "pap_severity"
_EXAMPLES = 5


def _relative(path: Path) -> str:
    """A path relative to the working directory when it lies below it: metrics files stay portable."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


@dataclass
class Failure:
    expectation: str  # short human name, e.g. "every image decodes"
    files: list[str]  # the offending paths; empty for whole-table checks
    detail: str  # what is wrong and what to do


@dataclass
class ValidationReport:
    success: bool
    failures: list[Failure]
    class_counts: dict[str, int]
    result_path: Path | None = None
    data_docs: Path | None = None
    n_cells: int = 0
    source: str = ""
    checks: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Flat JSON-able summary: the numbers DVC reads sit at the top level."""
        return {
            "success": self.success,
            "n_cells": self.n_cells,
            "n_failures": len(self.failures),
            "n_failed_files": len({f for failure in self.failures for f in failure.files}),
            "n_checks": len(self.checks),
            "source": self.source,
            "class_counts": dict(self.class_counts),
            "failures": [asdict(f) for f in self.failures],
            "data_docs": _relative(self.data_docs) if self.data_docs else None,
        }


# --------------------------------------------------------------------------- input


def _size(width: float, height: float) -> str:
    return f"{width:.0f}x{height:.0f} px" if not (np.isnan(width) or np.isnan(height)) else "of unknown size"


def _check_columns(df: pd.DataFrame, required: tuple[str, ...], what: str, hint: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"{what} must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"the {what} lacks column(s) {missing}; {hint}")


def _text(s: pd.Series) -> pd.Series:
    return s.astype(object).where(s.notna(), "").astype(str)


def _number(s: pd.Series) -> pd.Series:
    return pd.to_numeric(s.astype(object).where(s.notna(), np.nan), errors="coerce").astype(float)


def _checked_table(manifest: pd.DataFrame, cfg: DataConfig, splits: pd.DataFrame | None) -> pd.DataFrame:
    """The frame GX validates: the manifest's key columns plus one derived column per rule."""
    t = pd.DataFrame(index=pd.RangeIndex(len(manifest)))
    t["path"] = _text(manifest["path"]).to_numpy()
    t["class_name"] = _text(manifest["class_name"]).to_numpy()
    t["width"] = _number(manifest["width"]).to_numpy()
    t["height"] = _number(manifest["height"]).to_numpy()

    # Every image decodes: the manifest's message, or one for a size it could not read.
    image_error = _text(manifest["image_error"]).to_numpy()
    no_size = (t["width"].isna() | t["height"].isna()).to_numpy()
    t["image_problem"] = np.where(
        (image_error == "") & no_size, "image size unknown (width/height missing in the manifest)", image_error
    )

    # Masks: present; where present, decodes; where it decodes, has its image's size and holds a nucleus.
    mask_path = _text(manifest["mask_path"]).to_numpy()
    mask_error = _text(manifest["mask_error"]).to_numpy()
    nucleus = _number(manifest["nucleus_fraction"]).to_numpy()
    has_mask = mask_path != ""
    decodes = has_mask & (mask_error == "")
    if cfg.require_masks:
        t["has_mask"] = has_mask
        t["mask_problem"] = pd.Series(np.where(has_mask, mask_error, None), dtype=object)
        # Judged only where both sizes are known: an image that does not decode is named by its own check.
        mask_w, mask_h = _number(manifest["mask_width"]).to_numpy(), _number(manifest["mask_height"]).to_numpy()
        w, h = t["width"].to_numpy(), t["height"].to_numpy()
        sized = decodes & ~np.isnan(w) & ~np.isnan(h)
        wrong_size = sized & ((mask_w != w) | (mask_h != h))  # NaN (size not recorded) compares unequal
        t["mask_size_problem"] = pd.Series(
            [(f"mask {_size(mw, mh)}, image {_size(iw, ih)}" if bad else "") if ok else None
             for ok, bad, mw, mh, iw, ih in zip(sized, wrong_size, mask_w, mask_h, w, h)],
            dtype=object,
        )
        # A decoded mask of the right size without a computed fraction counts as holding no nucleus.
        t["mask_nucleus_fraction"] = np.where(decodes & ~wrong_size, np.nan_to_num(nucleus, nan=0.0), np.nan)

    # No sha256 in two classes: the number of distinct classes per checksum (null if no checksum).
    sha = _text(manifest["sha256"])
    t["sha256"] = sha.to_numpy()
    known_sha = sha != ""
    per_sha = t.loc[known_sha.to_numpy(), "class_name"].groupby(sha[known_sha].to_numpy()).nunique()
    t["classes_per_sha256"] = sha.map(per_sha).astype(float).where(known_sha).to_numpy()

    if splits is not None:
        # Parts are counted over every repeat (the test part is the same in each); folds within each
        # repeat, where a cell lies in exactly one, and the worst repeat counts.
        s_sha = _text(splits["sha256"])
        part = _text(splits["part"])
        fold = pd.to_numeric(splits["fold"], errors="coerce")
        repeat = pd.to_numeric(splits["repeat"], errors="coerce") if "repeat" in splits else pd.Series(0, splits.index)
        ok = s_sha != ""
        parts_per_sha = part[ok].groupby(s_sha[ok]).nunique()
        cv = ok & (part == "cv")
        folds_per_sha = fold[cv].groupby([s_sha[cv], repeat[cv]]).nunique().groupby(level=0).max()
        t["split_parts_per_sha256"] = sha.map(parts_per_sha).astype(float).where(known_sha).to_numpy()
        t["cv_folds_per_sha256"] = sha.map(folds_per_sha).astype(float).where(known_sha).to_numpy()
    return t


# --------------------------------------------------------------------------- checks


@dataclass
class _Check:
    key: str
    name: str
    expectation: Any
    # (offending paths, table, failing GX result dict) -> detail
    explain: Callable[[list[str], pd.DataFrame, dict], str]


def _examples(paths: list[str], reason: Callable[[str], str] | None = None) -> str:
    shown = [f"{p} ({reason(p)})" if reason else p for p in paths[:_EXAMPLES]]
    more = f" and {len(paths) - _EXAMPLES} more" if len(paths) > _EXAMPLES else ""
    return ", ".join(shown) + more


def _by_path(table: pd.DataFrame, column: str) -> Callable[[str], str]:
    lookup = table.drop_duplicates("path").set_index("path")[column]
    return lambda p: str(lookup.get(p, ""))


def _checks(cfg: DataConfig, with_splits: bool) -> list[_Check]:
    import great_expectations as gx

    E = gx.expectations
    lo, hi = cfg.min_size, cfg.max_size
    known = list(CLASS_FOLDERS)

    def size_reason(table: pd.DataFrame) -> Callable[[str], str]:
        w, h = _by_path(table, "width"), _by_path(table, "height")
        return lambda p: f"{float(w(p)):.0f}x{float(h(p)):.0f}"

    checks = [
        _Check(
            "row_count",
            "the manifest holds cells",
            E.ExpectTableRowCountToBeBetween(min_value=1),
            lambda files, t, r: "the manifest is empty: no cell images were found; "
            "check that data.root points at the folder holding the class folders",
        ),
        _Check(
            "known_classes",
            "known class set",
            E.ExpectColumnValuesToBeInSet(column="class_name", value_set=known),
            lambda files, t, r: f"{len(files)} image(s) lie in folder(s) "
            f"{sorted(set(t.loc[t['path'].isin(files), 'class_name']))} that are not Herlev classes "
            f"(expected one of {', '.join(known)}): {_examples(files)}; "
            "move them into their class folder or delete them",
        ),
        _Check(
            "every_class",
            "every class present",
            E.ExpectColumnDistinctValuesToContainSet(column="class_name", value_set=known),
            lambda files, t, r: "no cells in class folder(s) "
            f"{sorted(set(known) - set(t['class_name']))}; the data set is incomplete: "
            "check data.root and re-extract or re-synthesise the data",
        ),
        _Check(
            "width",
            f"image width within [{lo}, {hi}] px",
            E.ExpectColumnValuesToBeBetween(column="width", min_value=lo, max_value=hi),
            lambda files, t, r: f"{len(files)} image(s) have a width outside [{lo}, {hi}] px: "
            f"{_examples(files, size_reason(t))}; remove them or change data.min_size/data.max_size",
        ),
        _Check(
            "height",
            f"image height within [{lo}, {hi}] px",
            E.ExpectColumnValuesToBeBetween(column="height", min_value=lo, max_value=hi),
            lambda files, t, r: f"{len(files)} image(s) have a height outside [{lo}, {hi}] px: "
            f"{_examples(files, size_reason(t))}; remove them or change data.min_size/data.max_size",
        ),
        _Check(
            "image_decodes",
            "every image decodes",
            E.ExpectColumnValuesToBeInSet(column="image_problem", value_set=[""]),
            lambda files, t, r: f"{len(files)} image(s) do not decode: "
            f"{_examples(files, _by_path(t, 'image_problem'))}; re-download or replace them, or delete them",
        ),
    ]
    if cfg.require_masks:
        checks += [
            _Check(
                "mask_present",
                "every cell has a mask",
                E.ExpectColumnValuesToBeInSet(column="has_mask", value_set=[True]),
                lambda files, t, r: f"{len(files)} image(s) have no NAME-d.bmp mask beside them: "
                f"{_examples(files)}; restore the masks or set data.require_masks: false",
            ),
            _Check(
                "mask_decodes",
                "every mask decodes",
                E.ExpectColumnValuesToBeInSet(column="mask_problem", value_set=[""]),
                lambda files, t, r: f"{len(files)} mask(s) do not decode: "
                f"{_examples(files, _by_path(t, 'mask_problem'))}; re-download or replace the -d.bmp files",
            ),
            _Check(
                "mask_size",
                "every mask has its image's size",
                E.ExpectColumnValuesToBeInSet(column="mask_size_problem", value_set=[""]),
                lambda files, t, r: f"{len(files)} mask(s) differ in size from their image, so they do not "
                f"outline it: {_examples(files, _by_path(t, 'mask_size_problem'))}; replace the -d.bmp files "
                "with the masks drawn on these images",
            ),
            _Check(
                "mask_nucleus",
                "every mask holds a nucleus",
                E.ExpectColumnValuesToBeBetween(column="mask_nucleus_fraction", min_value=0.0, strict_min=True),
                lambda files, t, r: f"{len(files)} mask(s) hold no nucleus pixel (pure blue, RGB 0,0,255): "
                f"{_examples(files)}; fix or replace their -d.bmp masks",
            ),
        ]
    checks.append(
        _Check(
            "sha256_one_class",
            "no image shared by two classes",
            E.ExpectColumnValuesToBeBetween(column="classes_per_sha256", max_value=1),
            lambda files, t, r: f"{len(files)} file(s) are byte-identical copies filed under different classes: "
            f"{_examples(files, _by_path(t, 'class_name'))}; keep each image in its one true class folder",
        )
    )
    if with_splits:
        checks += [
            _Check(
                "split_parts_disjoint",
                "test, calibration and cv parts disjoint",
                E.ExpectColumnValuesToBeBetween(column="split_parts_per_sha256", max_value=1),
                lambda files, t, r: f"{len(files)} file(s) share a sha256 between two parts (test, calib, cv): "
                f"{_examples(files)}; rebuild the splits with `pap-severity data split`",
            ),
            _Check(
                "cv_folds_disjoint",
                "cv folds disjoint",
                E.ExpectColumnValuesToBeBetween(column="cv_folds_per_sha256", max_value=1),
                lambda files, t, r: f"{len(files)} file(s) share a sha256 between two cv folds of one repeat: "
                f"{_examples(files)}; rebuild the splits with `pap-severity data split`",
            ),
        ]
    for c in checks:
        c.expectation.meta = {"check": c.key, "name": c.name}
        c.expectation.notes = c.name
    return checks


# --------------------------------------------------------------------------- GX run


def _quiet_gx() -> None:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def _run_suite(
    table: pd.DataFrame, checks: list[_Check], docs_dir: Path | None
) -> tuple[dict[str, Any], Path | None]:
    """Run the suite through one checkpoint.

    Returns {check key: ExpectationValidationResult} and the data docs index.html (or None).
    """
    _quiet_gx()
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    for site in list(context.list_data_docs_sites()):  # the ephemeral default site under /tmp
        context.delete_data_docs_site(site)
    actions = []
    if docs_dir is not None:
        context.add_data_docs_site(
            _SITE,
            {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        actions.append(gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[_SITE]))

    batch = (
        context.data_sources.add_pandas(name="pap_severity")
        .add_dataframe_asset(name="cells")
        .add_batch_definition_whole_dataframe(name="manifest")
    )
    suite = context.suites.add(gx.ExpectationSuite(name=SUITE_NAME))
    for c in checks:
        suite.add_expectation(c.expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="manifest", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name=f"manifest-{uuid.uuid4().hex[:8]}",
            validation_definitions=[definition],
            actions=actions,
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": ["path"],
                "return_unexpected_index_query": False,
            },
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": table})
    by_key: dict[str, Any] = {}
    for suite_result in result.run_results.values():
        for r in suite_result.results:
            by_key[(r.expectation_config.meta or {}).get("check", r.expectation_config.type)] = r
    index = docs_dir / "index.html" if docs_dir is not None and (docs_dir / "index.html").is_file() else None
    return by_key, index


def _offending_paths(result: Any) -> list[str]:
    rows = (result.result or {}).get("unexpected_index_list") or []
    paths = {str(row["path"]) for row in rows if isinstance(row, dict) and "path" in row}
    return sorted(paths)


def _failures(checks: list[_Check], results: dict[str, Any], table: pd.DataFrame,
              splits: pd.DataFrame | None) -> list[Failure]:
    failures = []
    for c in checks:
        r = results.get(c.key)
        if r is None:
            failures.append(Failure(c.name, [], "the check did not run (no result from Great Expectations)"))
            continue
        if r.success:
            continue
        info = r.exception_info or {}
        if info.get("raised_exception"):
            failures.append(Failure(c.name, [], f"the check could not run: {info.get('exception_message')}"))
            continue
        files = _offending_paths(r)
        if c.key in ("split_parts_disjoint", "cv_folds_disjoint") and splits is not None and files:
            # Also name split rows whose copies are not in the manifest under the same path.
            shas = set(table.loc[table["path"].isin(files), "sha256"]) - {""}
            extra = _text(splits.loc[_text(splits["sha256"]).isin(shas), "path"])
            files = sorted(set(files) | set(extra))
        failures.append(Failure(c.name, files, c.explain(files, table, r.result or {})))
    return failures


# --------------------------------------------------------------------------- API


def class_counts(manifest: pd.DataFrame) -> dict[str, int]:
    """Cells per class folder: the seven Herlev classes (0 when empty) then any unknown folder."""
    counts = _text(manifest["class_name"]).value_counts() if "class_name" in manifest else pd.Series(dtype=int)
    out = {name: int(counts.get(name, 0)) for name in CLASS_FOLDERS}
    for name in sorted(set(counts.index) - set(CLASS_FOLDERS)):
        out[name] = int(counts[name])
    return out


def validate_manifest(
    manifest: pd.DataFrame,
    cfg: DataConfig,
    splits: pd.DataFrame | None = None,
    out_dir: str | Path | None = None,
) -> ValidationReport:
    """Run the suite over the manifest (and the splits, if given); write the JSON and data docs to out_dir.

    Raises ValueError for a manifest or splits frame without the expected columns; an empty
    manifest is a failed validation ("the manifest holds cells"), not an error.
    """
    if isinstance(manifest, pd.DataFrame) and manifest.empty:
        manifest = manifest.reindex(columns=list(dict.fromkeys([*manifest.columns, *MANIFEST_COLUMNS])))
    _check_columns(manifest, MANIFEST_COLUMNS, "manifest", "build it with `pap-severity data manifest`")
    if splits is not None:
        _check_columns(splits, SPLITS_COLUMNS, "splits", "rebuild them with `pap-severity data split`")
        bad_parts = sorted(set(_text(splits["part"])) - set(SPLIT_PARTS))
        if bad_parts:
            raise ValueError(f"the splits hold unknown part(s) {bad_parts}; expected {list(SPLIT_PARTS)}")

    table = _checked_table(manifest.reset_index(drop=True), cfg, splits)
    checks = _checks(cfg, with_splits=splits is not None)

    out = Path(out_dir) if out_dir is not None else None
    docs_dir = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        docs_dir = (out / DOCS_DIR).resolve()
        shutil.rmtree(docs_dir, ignore_errors=True)  # one run's docs, not an accumulation

    results, docs_index = _run_suite(table, checks, docs_dir)
    failures = _failures(checks, results, table, splits)
    sources = sorted(set(_text(manifest["source"])) - {""})
    report = ValidationReport(
        success=not failures,
        failures=failures,
        class_counts=class_counts(manifest),
        data_docs=docs_index,
        n_cells=len(manifest),
        source="+".join(sources),
        checks=[c.name for c in checks],
    )
    if out is not None:
        report.result_path = out / RESULT_FILE
        write_json(report.to_dict(), report.result_path)
    return report
