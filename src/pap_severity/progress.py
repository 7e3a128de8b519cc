"""Progress bars that follow the terminal and TQDM_DISABLE, so logs and CI output stay clean.

tqdm draws a bar when `disable=False`, whatever its output is; with `disable=None` it draws one
only on a terminal. It reads TQDM_DISABLE only for arguments the caller leaves out, and only when
tqdm is imported. So every bar of the package goes through `progress_bar`: no bar when the caller
turns progress off or TQDM_DISABLE is set (read when the bar starts, by tqdm's rule: any
non-empty value), else a bar on a terminal only.
"""

from __future__ import annotations

import os

from tqdm import tqdm

ENV = "TQDM_DISABLE"


def bars_disabled(progress: bool = True) -> bool | None:
    """tqdm's `disable`: True when progress is off or TQDM_DISABLE is set, else None (terminal only)."""
    return True if not progress or os.environ.get(ENV) else None


def progress_bar(iterable=None, *, progress: bool = True, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) with `disable` from bars_disabled(progress)."""
    return tqdm(iterable, disable=bars_disabled(progress), **kwargs)
