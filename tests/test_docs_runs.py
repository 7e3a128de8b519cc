"""The params files of docs/runs, which docs/results.md quotes as commands, load under the current schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from pap_severity.config import load_config

RUNS = sorted((Path(__file__).resolve().parents[1] / "docs" / "runs").glob("*.params.yaml"))


def test_there_are_run_files():
    assert RUNS


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.name)
def test_a_documented_run_loads(path):
    cfg = load_config(path)
    assert "herlev-" in cfg.data.root, "a documented run names the real data it used"
