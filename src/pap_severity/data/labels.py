"""Herlev class folders and the five severity levels of the paper.

The three normal folders merge into one class, giving severity 0..4 and the
paper's score 1..5 (score = severity + 1).
"""

from __future__ import annotations

CLASS_FOLDERS: tuple[str, ...] = (
    "normal_superficiel",
    "normal_intermediate",
    "normal_columnar",
    "light_dysplastic",
    "moderate_dysplastic",
    "severe_dysplastic",
    "carcinoma_in_situ",
)

SEVERITY_NAMES: tuple[str, ...] = (
    "normal",
    "light",
    "moderate",
    "severe",
    "carcinoma_in_situ",
)
NUM_SEVERITIES = len(SEVERITY_NAMES)

_SEVERITY_OF_FOLDER = {
    "normal_superficiel": 0,
    "normal_intermediate": 0,
    "normal_columnar": 0,
    "light_dysplastic": 1,
    "moderate_dysplastic": 2,
    "severe_dysplastic": 3,
    "carcinoma_in_situ": 4,
}


def is_class_folder(name: str) -> bool:
    return name in _SEVERITY_OF_FOLDER


def severity_of(class_name: str) -> int:
    """Severity index 0..4 of a 7-class folder name."""
    try:
        return _SEVERITY_OF_FOLDER[class_name]
    except KeyError:
        raise ValueError(
            f"unknown Herlev class folder {class_name!r}; expected one of {', '.join(CLASS_FOLDERS)}"
        ) from None


def score_of(severity: int) -> int:
    """The paper's severity score 1..5."""
    if not 0 <= severity < NUM_SEVERITIES:
        raise ValueError(f"severity must be 0..{NUM_SEVERITIES - 1}, got {severity}")
    return severity + 1


def is_abnormal(severity: int) -> bool:
    """Binary label of the paper: every dysplastic or in-situ cell is abnormal."""
    return severity > 0
