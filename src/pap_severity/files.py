"""Writing result files: JSON that any reader accepts, written so a kill never leaves half a file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd


def json_ready(value):
    """A JSON-ready copy: NaN and inf -> None (null), numpy scalars and arrays -> Python, other objects -> str."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def write_text(path: str | Path, text: str) -> Path:
    """Write next to the target, then rename over it: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_text(text)
    partial.replace(path)
    return path


def write_json(content, path: str | Path, sort_keys: bool = False) -> Path:
    return write_text(path, json.dumps(json_ready(content), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n")


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """A table as CSV without its index (missing values as empty fields), written atomically."""
    return write_text(path, frame.to_csv(index=False))
