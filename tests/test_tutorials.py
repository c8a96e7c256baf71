"""Every tutorial runs top to bottom in fast mode, and the numbers it finds are right."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("[0-9]*.py"))


def _numbers(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from _numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def test_there_are_tutorials():
    assert TUTORIALS and TUTORIALS[0].name == "01_simulate_galaxies.py"


@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(script, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "DEEPMORPH_FAST": "1", "DEEPMORPH_OUT": str(out), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    summary = json.loads((out / "summary.json").read_text())
    values = list(_numbers(summary))
    assert values and all(math.isfinite(v) for v in values)
    if script.stem == "01_simulate_galaxies":
        assert summary["centroid_error_pix"] < 0.02 and summary["pa_error_deg"] < 0.5
        assert abs(summary["flux_ratio"] - 1) < 0.01
        assert abs(summary["sky_sigma_ratio"] - 1) < 0.05
        assert summary["dataset_max_abs_diff"] == 0.0
        if "galsim_median_rel_l2" in summary:
            assert summary["galsim_median_rel_l2"] < 0.005 and summary["galsim_max_rel_l2"] < 0.02
            assert summary["galsim_wrong_radius_median_rel_l2"] > 0.1  # the sqrt(q) convention matters
        assert sorted(p.name for p in out.glob("*.png"))[:2] == ["conventions.png", "gallery-candels.png"]
    if script.stem == "02_classify_galaxies":
        assert 0.0 <= summary["cnn_accuracy"] <= 1.0
        # Four balanced classes: chance is 25%; the classical route is far above it even here.
        assert summary["forest_accuracy"] > 0.5
        assert sum(summary["class_counts"]) == summary["n_predicted"] == 240
        assert len(summary["size_curve"]) == 4
        for name in ("learning-curves.png", "confusion-cnn.png", "confusion-forest.png", "size-curve.png"):
            assert (out / name).is_file(), name
    if script.stem == "03_image_to_image":
        assert summary["conv_matrix_shape"] == [4, 16] and max(summary["conv_errors"]) < 1e-12
        assert all(0 <= v <= 1 for v in summary["clumps"].values())
        assert summary["n_decomposed"] == 200 and summary["decompose"]["speedup"] > 1
        for name in ("clump-learning-curves.png", "clump-maps.fits", "bd-predictions/bulge.fits"):
            assert (out / name).is_file(), name


@pytest.mark.parametrize("script", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_is_a_percent_notebook(script):
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(script)
    kinds = [cell.cell_type for cell in nb.cells]
    assert kinds.count("markdown") >= 3 and kinds.count("code") >= 3
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
