"""Console output outside a terminal (a `ray job logs` file, CI): tables whole, progress as plain lines."""

from __future__ import annotations

import io

from rich.table import Table

from pcl_ray.console import console, progress


def test_a_wide_table_is_printed_whole_outside_a_terminal():
    out = io.StringIO()  # not a TTY: rich alone would assume 80 columns and cut the cells ("repre…")
    table = Table(title="pcl-ray results")
    names = ["representation", *(f"metric_with_a_long_name_{i}" for i in range(6))]
    for name in names:
        table.add_column(name)
    table.add_row("pcl_backbone_with_a_long_label", *("0.1234" for _ in names[1:]))
    console(out).print(table)
    text = out.getvalue()
    assert "…" not in text
    assert all(name in text for name in names) and "pcl_backbone_with_a_long_label" in text
    assert max(len(line) for line in text.splitlines()) > 80


def test_progress_outside_a_terminal_is_one_line_per_step():
    out = io.StringIO()
    seen = list(progress(["knn", "linear", "tsne"], "eval suites", file=out))
    assert seen == ["knn", "linear", "tsne"]
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"[pcl-ray] eval suites: {i}/3 done" for i in (1, 2, 3)]
