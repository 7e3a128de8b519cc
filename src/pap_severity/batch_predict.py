"""`pap-severity predict`: the served model's answers for many cells, with no server.

The model is a registered version: `models:/<registry.model_name>@<registry.alias>` (the
champion) by default, or any `models:/<name>/<version>` or `models:/<name>@<alias>`. Its pt2
archive is the one `pap-severity bento import` copies into the server, and it is rebuilt the
server's way (serving.served_from_module, checked against the export), so every number is the
number `/predict` gives: each file goes through serving.decode_cell (the same limits, EXIF
orientation), transforms.eval_transform and serving.prediction_rows, in batches of
`serve.batch_max_size`.

Inputs are image files or folders (searched at any depth for data.reader.IMAGE_SUFFIXES). A
file whose stem ends with the mask suffix (`-d`: Herlev's `<cell>-d.bmp`) is a mask, never a
cell; a cell's mask is `<stem><suffix>.<image suffix>` beside it. The CSV has one row per cell:
path, mask_path, error (a file the server would refuse has its one-line reason here, not a
crash), the severity fields, p_<class>, the uncertainty and referral fields, and the model's
URI and data source. With `explain`, each cell's Integrated Gradients heat map (the server's
PNG) goes to `<out stem>_heatmaps/<n>_<stem>.png`, and the cells with a mask get At_N / At_C
(serving.AttributionFractions' columns).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pap_severity.config import Config

log = logging.getLogger(__name__)

DEFAULT_MASK_SUFFIX = "-d"


@dataclass(frozen=True)
class Item:
    """One cell to answer: its image, and its mask when one lies beside it."""

    path: Path
    mask: Path | None = None


def collect(paths: Sequence[str | Path], mask_suffix: str = DEFAULT_MASK_SUFFIX) -> list[Item]:
    """The cells of `paths` (files, or folders searched at any depth), in order, each once; masks
    (stem ending with `mask_suffix`) are attached to their cell, never answered as cells."""
    from pap_severity.data.reader import IMAGE_SUFFIXES

    if not paths:
        raise ValueError("no input: give image files or folders")
    files: list[Path] = []
    for given in map(Path, paths):
        if given.is_dir():
            found = sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.name.startswith("."))
            if not found:
                raise ValueError(f"{given}: no images in this folder (looked for {', '.join(sorted(IMAGE_SUFFIXES))}"
                                 " at any depth)")
            files += found
        elif given.is_file():
            files.append(given)
        else:
            raise FileNotFoundError(f"{given}: no such file or folder")
    suffix = mask_suffix.lower()
    items, seen = [], set()
    for path in files:
        if suffix and path.stem.lower().endswith(suffix):
            continue
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        items.append(Item(path, _mask_of(path, mask_suffix, IMAGE_SUFFIXES)))
    if not items:
        raise ValueError(f"only masks (*{mask_suffix}.*) among the inputs: give the cell images too")
    return items


def _mask_of(path: Path, suffix: str, image_suffixes: Iterable[str]) -> Path | None:
    if not suffix:
        return None
    wanted = (path.stem + suffix).lower()
    for candidate in sorted(path.parent.iterdir()):
        if candidate.stem.lower() == wanted and candidate.suffix.lower() in image_suffixes and candidate.is_file():
            return candidate
    return None


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of models:/<name>/<version> or models:/<name>@<alias>."""
    rest = uri.removeprefix("models:/")
    if rest == uri or not rest:
        raise ValueError(f"--model-uri {uri!r}: give a registered model, models:/<name>/<version> or "
                         "models:/<name>@<alias>")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias and "/" not in rest:
            return name, None, alias
    else:
        name, _, version = rest.partition("/")
        if name and version.isdigit():
            return name, version, None
    raise ValueError(f"--model-uri {uri!r}: give models:/<name>/<version> (a number) or models:/<name>@<alias>")


def load_model(cfg: Config, model_uri: str | None = None, device: str = "cpu"):
    """The registered version of `model_uri` (default: the champion), rebuilt as the server runs it
    (a serving.ServedModel)."""
    import mlflow

    from pap_severity.registry import downloaded_version, find_version
    from pap_severity.serving import info_from_mlflow, served_from_module

    if model_uri:
        name, version, alias = parse_model_uri(model_uri)
    else:
        name, version, alias = cfg.registry.model_name, None, cfg.registry.alias
    mv = find_version(cfg, name, alias=alias, version=version)
    with downloaded_version(cfg, name, str(mv.version)) as (local, meta):
        if "preprocess" not in meta or "pipeline" not in meta:
            raise ValueError(f"models:/{name}/{mv.version} has no pipeline/preprocess metadata; register it with "
                             "`pap-severity register`")
        exported = mlflow.pytorch.load_model(str(local))
    info = info_from_mlflow(meta, name=name, version=str(mv.version),
                            data_source=mv.tags.get("data_source", "unknown"))
    return served_from_module(exported, info, device)


def flatten(response) -> dict:
    """One CSV row of a serving.PredictResponse: nested fields spread out."""
    from pap_severity.data.labels import SEVERITY_NAMES

    body = response.model_dump()
    row = {k: body[k] for k in ("severity", "severity_index", "severity_score", "abnormal_probability")}
    row |= {f"p_{name}": body["probabilities"][name] for name in SEVERITY_NAMES}
    uncertainty = body["uncertainty"] or {}
    row |= {k: uncertainty.get(k) for k in ("entropy", "score_std", "mutual_info", "disagreement", "members", "tta")}
    row |= {"uncertainty_note": uncertainty.get("note"), "uncertainty_reason": body["uncertainty_reason"],
            "refer": body["refer"], "refer_reason": body["refer_reason"], "rotated": body["rotated"],
            "model_uri": body["model"]["uri"], "data_source": body["model"]["data_source"],
            "caveat": body["model"]["caveat"]}
    return row


def predict_paths(cfg: Config, paths: Sequence[str | Path], out: str | Path, *, model_uri: str | None = None,
                  mask_suffix: str = DEFAULT_MASK_SUFFIX, explain: bool = False, progress: bool = True,
                  device: str = "cpu") -> pd.DataFrame:
    """Answer every cell of `paths` as /predict would (see the module docstring); write `out` (CSV)."""
    from pap_severity.progress import progress_bar
    from pap_severity.serving import RequestError, UploadLimits, decode_cell

    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise ValueError(f"--out {out}: give a .csv file")
    items = collect(paths, mask_suffix)
    served = load_model(cfg, model_uri, device)
    limits = UploadLimits.from_config(cfg)
    heatmaps = out.with_name(f"{out.stem}_heatmaps") if explain else None
    rows: list[dict] = []
    batch = max(1, cfg.serve.batch_max_size)
    with progress_bar(total=len(items), progress=progress, desc="predict", unit="cell") as bar:
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            decoded = []
            for n, item in enumerate(chunk, start):
                row = {"path": str(item.path), "mask_path": str(item.mask) if item.mask else None, "error": None}
                try:
                    decoded.append((row, item, n, *decode_cell(item.path, limits, "image")))
                except RequestError as exc:
                    row["error"] = exc.message
                rows.append(row)
            if decoded:
                _answer(served, decoded, heatmaps, cfg, limits)
            bar.update(len(chunk))
    table = pd.DataFrame(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    failed = int(table["error"].notna().sum())
    log.info("%d cells answered by %s, %d refused; wrote %s", len(table) - failed, served.info.uri, failed, out)
    return table


def _answer(served, decoded: list, heatmaps: Path | None, cfg: Config, limits) -> None:
    """Fill the rows of one batch of decoded cells: one forward pass, then (explain) IG cell by cell."""
    from pap_severity.serving import predict_responses
    from pap_severity.transforms import eval_transform

    transform = eval_transform(served.info.preprocess)
    x = np.stack([transform(im).numpy() for _, _, _, im, _ in decoded])
    outputs = served.forward(x)
    for i, (row, item, n, im, rotated) in enumerate(decoded):
        row.update(flatten(predict_responses(served.info, outputs[i:i + 1], rotated)[0]))
        if heatmaps is not None:  # numbered by the cell's place in the inputs: stems may repeat across folders
            row.update(_explained(served, item, im, heatmaps / f"{n:05d}_{item.path.stem}.png", cfg, limits))


def _explained(served, item: Item, im, png: Path, cfg: Config, limits) -> dict:
    """IG of one cell with the server's code and settings (explain:): its heat map PNG written to `png`,
    and At_N / At_C when its mask is usable (else why not)."""
    import torch

    from pap_severity import explain as ig
    from pap_severity.serving import RequestError, decode_mask_upload, fractions_model, heatmap

    extra: dict = {}
    codes = None
    if item.mask is not None:
        try:
            codes = decode_mask_upload(item.mask, limits, im.size, "mask")
        except RequestError as exc:
            extra["mask_error"] = exc.message
    cell = ig.prepare_image(im, served.info.preprocess, codes)
    with torch.enable_grad():
        result = ig.integrated_gradients(served.bundle, cell.input[None], cfg.explain)
    am = ig.attribution_map(result.attributions)[0]
    png.parent.mkdir(parents=True, exist_ok=True)
    png.write_bytes(heatmap(cell.rgb, am))
    extra |= {"heatmap": str(png), "relative_delta": float(result.relative_delta[0])}
    if cell.codes is not None:
        extra |= fractions_model(ig.attribution_fractions(am, cell.codes)).model_dump()
    return extra
