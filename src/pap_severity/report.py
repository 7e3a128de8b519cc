"""reports/index.html: one page linking everything a `dvc repro` produced.

It states the data source first, then the data validation, the pipeline comparison,
the figures, the attribution reports, the final models, and the registered version
with how to serve it. It links to the files the stages wrote; it copies none of them.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from pap_severity.evaluation import HEADLINE_LABELS

SHOWN = ("accuracy", "balanced_accuracy", "mean_auc", "mse", "qwk", "binary_accuracy", "binary_f1")
EXPLAIN_SHOWN = ("abs_at_n", "abs_at_c", "abs_at_ratio", "abs_at_n_norm", "rand_abs_at_n_norm")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222; }
table { border-collapse: collapse; margin: .5rem 0 1rem; } td, th { border: 1px solid #ccc; padding: .25rem .5rem; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.banner { padding: .75rem 1rem; border-radius: .4rem; font-size: 1.1rem; margin-bottom: 1rem; }
.synthetic { background: #fff3cd; border: 1px solid #e0c060; } .herlev { background: #e3f2e3; border: 1px solid #7bb07b; }
.fail { color: #a00; font-weight: bold; } .ok { color: #070; font-weight: bold; }
img { max-width: 32rem; margin: .25rem; border: 1px solid #ddd; } code, pre { background: #f6f6f6; }
"""


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _link(target: Path, base: Path, text: str | None = None) -> str:
    """A link from the page in `base` to `target`, relative so the folder can move."""
    href = Path(os.path.relpath(target, base)).as_posix()
    return f'<a href="{html.escape(href)}">{html.escape(text or target.name)}</a>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Cells are HTML already; the first column is a label, the others numbers."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c}</td>" if i == 0 else f'<td class="num">{c}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _banner(source: str | None) -> str:
    if source == "synthetic":
        return ('<div class="banner synthetic">Data source: <b>synthetic</b> cells made by <code>data synth</code>. '
                "These numbers test the code; they are not Herlev results.</div>")
    if source == "herlev":
        return '<div class="banner herlev">Data source: <b>Herlev</b> (real Pap smear cells).</div>'
    return f'<div class="banner">Data source: <b>{html.escape(str(source))}</b></div>'


def _validation(reports: Path) -> str:
    result = _read(reports / "validation" / "validation.json")
    if result is None:
        return "<p>No validation result (stage <code>validate</code> has not run).</p>"
    state = '<span class="ok">passed</span>' if result["success"] else '<span class="fail">failed</span>'
    counts = ", ".join(f"{k} {v}" for k, v in result.get("class_counts", {}).items())
    parts = [f"<p>{result['n_cells']} cells, {result.get('n_checks', '?')} checks: {state}. {html.escape(counts)}.</p>"]
    for failure in result.get("failures", []):
        parts.append(f"<p class='fail'>{html.escape(failure['expectation'])}: {html.escape(failure['detail'])}</p>")
    docs = reports / "validation" / "data_docs" / "index.html"
    if docs.is_file():
        parts.append(f"<p>Great Expectations data docs: {_link(docs, reports)}</p>")
    return "\n".join(parts)


def _comparison(reports: Path) -> str:
    comparison = _read(reports / "comparison.json")
    if comparison is None:
        return "<p>No comparison (stage <code>compare</code> has not run).</p>"
    header = ["pipeline", *(HEADLINE_LABELS[m] for m in SHOWN)]
    rows = [[html.escape(name), *(f"{_num(m[k]['mean'])} ± {_num(m[k]['std'])}" if m.get(k) else "n/a"
                                  for k in SHOWN)]
            for name, m in comparison["test"].items()]
    rows += [[f"paper: {html.escape(name)}", *(_num(fig.get(k)) if k in fig else "—" for k in SHOWN)]
             for name, fig in comparison.get("paper", {}).items()]
    settings = next(iter(comparison.get("settings", {}).values()), {}) or {}
    shown = ", ".join(f"{k}={v}" for k, v in settings.items())
    return (f"<p>Held-out test part, mean ± std over the {next(iter(comparison['n_folds'].values()))} fold models "
            f"(rows marked <i>paper</i> are the published figures, not produced here). Settings: "
            f"<code>{html.escape(shown)}</code>. Full tables: {_link(reports / 'comparison.md', reports)}.</p>"
            + _table(header, rows))


def _figures(reports: Path, pipelines: list[str]) -> str:
    figures = reports / "figures"
    images = [figures / "auc_per_fold.png"]
    for name in pipelines:
        images += [figures / name / "confusion_test.png", figures / name / "scores_test.png"]
    found = [p for p in images if p.is_file()]
    if not found:
        return "<p>No figures yet.</p>"
    return "\n".join(f'<a href="{p.relative_to(reports).as_posix()}"><img src="{p.relative_to(reports).as_posix()}" '
                     f'alt="{html.escape(p.stem)}"></a>' for p in found)


def _explain(reports: Path) -> str:
    parts = []
    for summary_file in sorted((reports / "explain").glob("*/summary.json")):
        summary = _read(summary_file)
        folder = summary_file.parent
        header = ["class", "n", *EXPLAIN_SHOWN]
        rows = [[html.escape(name), str(v.get("n", "")), *(_num(v.get(k)) for k in EXPLAIN_SHOWN)]
                for name, v in summary.get("per_class", {}).items()]
        parts.append(f"<h3>{html.escape(folder.name)}</h3><p>Integrated Gradients, "
                     f"{html.escape(str(summary['settings'].get('baseline')))} baseline, on {summary['n_cells']} "
                     f"test cells: {_link(folder / 'report.html', reports, 'report.html')}, "
                     f"{_link(folder / 'attributions.csv', reports, 'attributions.csv')}. "
                     "abs_at_n_norm above 1 means attribution concentrates on the nucleus beyond its area; "
                     "rand_ is the random-map floor.</p>" + _table(header, rows))
    return "\n".join(parts) or "<p>No attribution report (stage <code>explain</code> has not run).</p>"


def _final(metrics_dir: Path, reports: Path) -> str:
    rows = []
    for path in sorted((metrics_dir / "final").glob("*.json")):
        m = _read(path)
        rows.append([html.escape(m["pipeline"]), *(_num(m.get(k)) for k in SHOWN)])
    if not rows:
        return "<p>No final models yet.</p>"
    return ("<p>Each pipeline trained once on every cv cell with its tuned settings, measured on the held-out "
            "test part.</p>" + _table(["pipeline", *(HEADLINE_LABELS[m] for m in SHOWN)], rows))


def _registry(reports: Path) -> str:
    registry = _read(reports / "registry.json")
    if registry is None:
        return "<p>Nothing registered yet (stage <code>register</code>).</p>"
    rows = [[html.escape(r["name"]), str(r["version"]), "champion" if r["promoted"] else "—",
             html.escape(r.get("reason", ""))] for r in registry]
    bento = _read(reports / "bento.json")
    serve = ("<p>Serve it:</p><pre>pap-severity bento import   # or: dvc repro bento_build\n"
             "cd bento && bentoml serve --port 3000\n"
             "curl -F image=@cell.BMP http://127.0.0.1:3000/predict</pre>")
    if bento:
        serve = (f"<p>Bento <code>{html.escape(bento['bento'])}</code> is built. Serve it:</p>"
                 f"<pre>{html.escape(bento['serve'])} --port 3000\n"
                 "curl -F image=@cell.BMP http://127.0.0.1:3000/predict</pre>")
    return (_table(["registered model", "version", "alias", "promotion"], rows)
            + "<p>Browse runs and versions with <code>mlflow ui --backend-store-uri sqlite:///mlflow.db</code>.</p>"
            + serve)


def write_index(reports: str | Path = "reports", metrics: str | Path = "metrics",
                pipelines: tuple[str, ...] = ()) -> Path:
    """Write reports/index.html from what the stages left; a missing part says which stage makes it."""
    reports, metrics = Path(reports), Path(metrics)
    validation = _read(reports / "validation" / "validation.json") or {}
    source = validation.get("source")
    sections = [
        ("Data validation", _validation(reports)),
        ("Pipeline comparison (cross-validation)", _comparison(reports)),
        ("Figures", _figures(reports, list(pipelines))),
        ("Attribution (Integrated Gradients)", _explain(reports)),
        ("Final models", _final(metrics, reports)),
        ("Registered model and serving", _registry(reports)),
    ]
    body = "\n".join(f"<h2>{html.escape(title)}</h2>\n{content}" for title, content in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>pap-severity run</title>"
            f"<style>{STYLE}</style></head><body><h1>pap-severity: one run</h1>{_banner(source)}{body}</body></html>")
    out = reports / "index.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
