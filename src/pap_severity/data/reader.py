"""Finding and opening Herlev cells on disk: the smear2005 layout at any depth below a root.

A cell is an image `NAME.<ext>` inside a class folder, with its mask `NAME-d.bmp`
beside it when the set has masks. Images outside the seven class folders are
still returned, under their own folder name, so that validation can name them.
Every file is read through `read_bytes` or `open_image`, which turn whatever is wrong
with it (a symlink loop, a dangling link, a pipe, a truncated image) into a ValueError
that says what, so the caller can record it against the file and go on.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from pap_severity.data.labels import CLASS_FOLDERS, is_class_folder

ORIENTATION_TAG = 0x0112  # EXIF Orientation


def upright(image: Image.Image) -> tuple[Image.Image, bool]:
    """The image as a viewer shows it (EXIF orientation applied), and whether that turned it.

    Cells have no orientation, but a sideways non-square image pads and resizes differently, and
    a heat map must line up with what the user sees: every reader of cells calls this first."""
    turned = image.getexif().get(ORIENTATION_TAG, 1) in range(2, 9)
    return (ImageOps.exif_transpose(image) if turned else image), turned


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


def _unreadable(path: Path, exc: OSError) -> str:
    """What an OSError from stat or open means for a data file, in words."""
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (the link leads back to itself)"
    if exc.errno == errno.ENOENT and path.is_symlink():
        return f"dangling symbolic link (its target {os.readlink(path)} does not exist)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "not readable (permission denied)"
    return f"unreadable ({exc.strerror or exc})"


def _checked(path: Path) -> int:
    """The size of path in bytes; ValueError unless it is a regular file that can be opened."""
    try:
        info = path.stat()
    except OSError as exc:
        raise ValueError(_unreadable(path, exc)) from None
    if not stat.S_ISREG(info.st_mode):
        # A pipe or device would block or never end; a folder is not an image.
        raise ValueError("not a regular file (a folder, pipe or device)")
    return info.st_size


def read_bytes(path: str | Path) -> bytes:
    """The file's content; ValueError (saying why) for links that lead nowhere and unreadable files."""
    path = Path(path)
    _checked(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(_unreadable(path, exc)) from None


def _describe(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(exc, OSError) and "truncated" in str(exc).lower():
        return f"truncated image ({exc})"
    return f"{type(exc).__name__}: {exc}"


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image, upright as a viewer shows it (EXIF orientation applied).

    Raises a ValueError that says what is wrong (without the path: callers name the file).
    """
    path = Path(path)
    if _checked(path) == 0:
        raise ValueError("empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()
            return upright(im)[0].copy()
    except PermissionError as exc:
        raise ValueError(_unreadable(path, exc)) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(_describe(exc)) from None
