from pap_severity.report import write_index


def test_an_empty_run_says_which_stage_makes_each_part(tmp_path):
    page = write_index(tmp_path / "reports", tmp_path / "metrics").read_text()
    for stage in ("validate", "compare", "explain", "register"):
        assert f"<code>{stage}</code>" in page
    assert "No final models yet" in page


def test_a_herlev_run_is_labelled_herlev(tmp_path):
    (tmp_path / "reports" / "validation").mkdir(parents=True)
    (tmp_path / "reports" / "validation" / "validation.json").write_text(
        '{"success": true, "n_cells": 917, "n_checks": 12, "source": "herlev", "class_counts": {}, "failures": []}'
    )
    page = write_index(tmp_path / "reports", tmp_path / "metrics").read_text()
    assert "Data source: <b>Herlev</b>" in page and "917 cells, 12 checks" in page
    assert "<b>synthetic</b>" not in page
