"""Artifact files: CSV written in one place, columns as asked, atomically."""

from __future__ import annotations

import csv

from artifacts.io import atomic_write_csv, csv_text


def test_csv_columns_follow_the_rows_or_the_request(tmp_path):
    rows = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "epoch": 1}]
    # Every key the rows have, first seen first; a missing value is empty.
    assert csv_text(rows).splitlines() == ["step,loss,epoch", "1,0.5,", "2,0.25,1"]
    # Asked columns: that order, others left out, absent ones empty.
    assert csv_text(rows, ["epoch", "step"]).splitlines() == ["epoch,step", ",1", "1,2"]
    path = atomic_write_csv(tmp_path / "out" / "history.csv", rows, ["step", "loss"])
    with path.open(newline="") as handle:
        assert list(csv.DictReader(handle)) == [
            {"step": "1", "loss": "0.5"},
            {"step": "2", "loss": "0.25"},
        ]
    assert [p.name for p in path.parent.iterdir()] == ["history.csv"]  # no temporary left
    # A comma inside a value is quoted, not a new column.
    assert csv_text([{"path": "a,b.png"}]).splitlines()[1] == '"a,b.png"'
