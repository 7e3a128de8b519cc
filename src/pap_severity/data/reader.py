"""Finding Herlev cells on disk: the smear2005 layout at any depth below a root.

A cell is an image `NAME.<ext>` inside a class folder, with its mask `NAME-d.bmp`
beside it when the set has masks. Images outside the seven class folders are
still returned, under their own folder name, so that validation can name them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pap_severity.data.labels import CLASS_FOLDERS, is_class_folder

IMAGE_SUFFIXES = frozenset({".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff"})
MASK_SUFFIX = "-d.bmp"


class DataError(ValueError):
    """The data on disk cannot be read as a Herlev set."""


@dataclass(frozen=True)
class CellFile:
    image: Path
    mask: Path | None
    class_name: str


def is_mask_file(path: Path) -> bool:
    return path.name.lower().endswith(MASK_SUFFIX)


def _class_of(path: Path, root: Path) -> str:
    """The nearest enclosing class folder below root, else the image's own folder name."""
    folders = path.parent.relative_to(root).parts
    for name in reversed(folders):
        if is_class_folder(name):
            return name
    return path.parent.name


def find_cells(root: str | Path) -> list[CellFile]:
    """Every cell image below root, sorted by path, each with its mask if one lies beside it."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such folder; give the folder that holds the Herlev class folders")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; give the folder that holds the Herlev class folders")
    cells: list[CellFile] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        here = Path(dirpath)
        masks = {name.lower(): here / name for name in filenames if name.lower().endswith(MASK_SUFFIX)}
        for name in sorted(filenames):
            path = here / name
            if name.startswith(".") or is_mask_file(path) or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            mask = masks.get((path.stem + MASK_SUFFIX).lower())
            cells.append(CellFile(image=path, mask=mask, class_name=_class_of(path, root)))
    if not cells:
        raise DataError(
            f"{root}: no cell images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))} at any depth); "
            f"expected class folders such as {', '.join(CLASS_FOLDERS[:2])}, ..."
        )
    return cells
