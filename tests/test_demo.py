"""The out-of-the-box demo end to end at a tiny size (the real one runs ~10 min)."""
from __future__ import annotations

import json

import pytest

from covidmt_jax.lungs import SHIPPED_DIR


@pytest.mark.skipif(not (SHIPPED_DIR / "model.json").is_file(), reason="no shipped lung U-Net")
def test_demo_runs_end_to_end_and_reports(tmp_path):
    from covidmt_jax import demo
    demo.main(["--workdir", str(tmp_path), "--size", "64", "--n", "24", "--steps", "3",
               "--pairs", "12"])
    report = (tmp_path / "report.md").read_text()
    assert "## What this run shows" in report and "PI:" in report
    summary = json.loads((tmp_path / "score" / "summary.json").read_text())
    assert set(summary["models"]) == {"baseline ResNet-18", "COVIDMT ResNet-18"}
    for s in summary["models"].values():
        assert s["n_pairs"] == 12
    assert (tmp_path / "score" / "pi.png").is_file()
    # a second run resumes every stage instead of starting again
    demo.main(["--workdir", str(tmp_path), "--size", "64", "--n", "24", "--steps", "3",
               "--pairs", "12"])
    rows = (tmp_path / "score" / "rows.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 12
