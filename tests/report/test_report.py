"""Report figures and the self-contained HTML report (synthetic inputs: no simulation needed)."""

from __future__ import annotations

import base64
import json
import math
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from astropy.table import Table
from matplotlib.figure import Figure

from deepmorph.errors import DeepmorphValueError
from deepmorph.report import (
    Report,
    asinh_stretch,
    parameter_distributions,
    residual_figure,
    speed_bar,
    stamp_gallery,
    to_jsonable,
)

LABELS = ("spheroid", "disk", "edge-on", "clumpy")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _batch(b=5, s=24, masks=True, seed=0):
    """A batch shaped like Simulator.simulate's output: Gaussian blobs plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:s, :s] - 0.5 * (s - 1)
    blob = np.exp(-(x**2 + y**2) / 8.0)
    noiseless = np.stack([(10.0 + i) * blob for i in range(b)])[:, None].astype(np.float32)
    out = {
        "images": noiseless + rng.normal(0, 0.1, noiseless.shape).astype(np.float32),
        "noiseless": noiseless,
        "catalog": {
            "id": np.arange(b, dtype=np.int64),
            "mag": np.linspace(19, 23, b),
            "bulge_to_total": np.linspace(0, 1, b),
            "bulge_n": np.linspace(1, 6, b),
            "bulge_hlr_arcsec": np.linspace(0.1, 1.0, b),
            "disk_hlr_arcsec": np.linspace(0.2, 2.0, b),
            "bulge_q": np.linspace(0.2, 0.9, b),
            "disk_q": np.linspace(0.1, 0.95, b),
            "pa_deg": np.linspace(0, 170, b),
            "label": np.arange(b) % 4,
        },
    }
    if masks:
        out["bulge"] = 0.5 * noiseless
        out["disk"] = 0.5 * noiseless
        out["clump_mask"] = np.zeros((b, 1, s, s), np.uint8)
        out["clump_mask"][1, 0, 14:17, 4:7] = 1
        out["clump_table"] = {"id": np.array([1, 1]), "x_pix": np.array([-6.5, 3.0]), "y_pix": np.array([4.0, -2.0])}
        out["neighbor_mask"] = np.zeros((b, 1, s, s), np.uint8)
        out["neighbor_table"] = {"id": np.array([2]), "x_pix": np.array([8.0]), "y_pix": np.array([8.0])}
    return out


# -- figures -----------------------------------------------------------------------------------------
def test_asinh_stretch_fixed_points():
    v = asinh_stretch(np.array([0.0, 1.0, 100.0, -1.0]), softening=1.0, peak=100.0)
    assert v[0] == 0.0 and v[2] == pytest.approx(1.0)
    assert v[1] == pytest.approx(np.arcsinh(1) / np.arcsinh(100))
    assert v[3] == pytest.approx(-v[1])


def test_stamp_gallery_rows_columns_and_clump_markers():
    batch = _batch()
    fig = stamp_gallery(batch, n=4, label_names=LABELS, title="t")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 6 * 4  # 6 rows (image, noise-free, bulge, disk, 2 masks) x 4 galaxies
    labels = [ax.get_ylabel() for ax in fig.axes[::4]]
    assert labels == ["noisy image", "noise-free", "bulge", "disk", "clump mask", "neighbour mask"]
    # galaxy 1 (column 1): both clump crosses at stamp centre + offset
    ax = fig.axes[4 * 4 + 1]
    (line,) = ax.get_lines()
    centre = 0.5 * (24 - 1)
    np.testing.assert_allclose(line.get_xdata(), centre + np.array([-6.5, 3.0]))
    np.testing.assert_allclose(line.get_ydata(), centre + np.array([4.0, -2.0]))
    # galaxies without clumps get no markers
    assert len(fig.axes[4 * 4 + 0].get_lines()) == 0 or len(fig.axes[4 * 4 + 0].get_lines()[0].get_xdata()) == 0
    # image rows of one column share the stretch: noiseless pixel at the peak maps to <= 1
    img = fig.axes[4 + 1].get_images()[0].get_array()
    assert float(np.max(img)) == pytest.approx(1.0, abs=0.05)
    assert fig.axes[0].get_images()[0].origin == "lower"


def test_stamp_gallery_without_components():
    batch = _batch(masks=False)
    fig = stamp_gallery(batch, n=3)
    assert len(fig.axes) == 2 * 3


def test_stamp_gallery_shows_one_of_each_label_first():
    batch = _batch(b=8)
    batch["catalog"]["label"] = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    fig = stamp_gallery(batch, n=4, label_names=LABELS)
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert [t.split()[1] for t in titles] == ["0", "3", "5", "6"]


def test_parameter_distributions_panels_and_counts():
    cat = _batch(b=8)["catalog"]
    fig = parameter_distributions(cat, LABELS)
    assert len(fig.axes) == 7
    heights = [p.get_height() for p in fig.axes[6].patches]
    assert heights == [2, 2, 2, 2]  # labels 0..3 twice each in 8 galaxies
    assert sum(p.get_height() for p in fig.axes[0].patches) == 8  # magnitude histogram holds every galaxy


def test_speed_bar_values():
    fig = speed_bar({"a": 1000.0, "b": 250.0})
    assert len(fig.axes) == 1
    assert [p.get_width() for p in fig.axes[0].patches] == [1000.0, 250.0]


def test_residual_figure_reports_the_error():
    ref = np.ones((16, 16))
    ours = ref.copy()
    ours[8, 8] += 0.16  # ||diff|| / ||ref|| = 0.16 / 16 = 1e-2
    fig = residual_figure(ours, ref)
    assert len(fig.axes) == 5  # three images + two colour bars
    assert "1.00e-02" in fig.axes[2].get_title()
    diff = fig.axes[2].get_images()[0].get_array()
    assert float(diff.max()) == pytest.approx(0.16)


# -- HTML report ---------------------------------------------------------------------------------------
class _Structure(HTMLParser):
    """Collects figures (with their captions), images' src, tables and external references."""

    def __init__(self):
        super().__init__()
        self.figures, self.srcs, self.external, self.tables, self.headings = [], [], [], 0, []
        self._in_caption = False
        self._tag = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._tag = tag
        if tag == "figure":
            self.figures.append({"img": 0, "caption": ""})
        if tag == "img":
            self.srcs.append(attrs.get("src", ""))
            if self.figures:
                self.figures[-1]["img"] += 1
        if tag == "figcaption":
            self._in_caption = True
        if tag == "table":
            self.tables += 1
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            if value and not value.startswith(("data:", "#")):
                self.external.append(value)
        if tag in ("script", "link", "iframe"):
            self.external.append(tag)

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self._in_caption = False

    def handle_data(self, data):
        if self._in_caption:
            self.figures[-1]["caption"] += data
        if self._tag in ("h2", "h3") and data.strip():
            self.headings.append(data.strip())
            self._tag = None


def _report(tmp_path):
    report = Report("Test report", intro="Intro text.", figure_dir=tmp_path / "figures")
    report.section("1. First")
    report.add_text("Some <b>escaped</b> text.")
    report.add_figure(speed_bar({"a": 3.0}), "Speed of a: 3 stamps/s.", name="speed")
    report.section("1.1 Sub", level=3)
    report.add_figure(residual_figure(np.ones((8, 8)), np.ones((8, 8))), "Residual: rel. L2 0.")
    report.add_table({"survey": ["a", "b"], "rate": [1.5, 2.25]}, caption="columns")
    report.add_table({"pixel scale": 0.06, "band": "H"}, caption="scalars")
    report.add_table([{"x": 1, "y": 2.0}, {"x": 3, "y": float("nan")}], caption="rows")
    table = Table({"mag": [20.0, 21.0], "hlr": [0.3, 0.4]})
    table["hlr"].unit = "arcsec"
    report.add_table(table, caption="astropy")
    report.metrics.update({"n": 3, "rate": np.float32(2.5), "nested": {"err": np.array([1e-4, 2e-4])},
                           "missing": float("nan")})
    return report


def test_report_is_self_contained_and_captioned(tmp_path):
    path = _report(tmp_path).write(tmp_path / "out" / "report.html")
    assert path == tmp_path / "out" / "report.html"
    text = path.read_text(encoding="utf-8")
    parsed = _Structure()
    parsed.feed(text)
    assert parsed.external == []  # nothing fetched from outside the file
    assert len(parsed.figures) == 2 and text.count("data:image/png;base64,") == 2
    for fig in parsed.figures:
        assert fig["img"] == 1 and len(fig["caption"].strip()) > len("Figure 1.")
    for src in parsed.srcs:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG_MAGIC
    assert "3 stamps/s" in parsed.figures[0]["caption"]
    assert parsed.tables == 4
    assert "hlr [arcsec]" in text  # astropy units in the header
    assert "&lt;b&gt;escaped&lt;/b&gt;" in text
    assert {"1. First", "1.1 Sub"} <= set(parsed.headings)
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["figure-2.png", "speed.png"]
    assert (tmp_path / "figures" / "speed.png").read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.json", "report.html"]  # no temp files left


def test_report_metrics_json(tmp_path):
    path = _report(tmp_path).write(tmp_path / "report.html")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n"] == 3 and metrics["rate"] == 2.5
    assert metrics["nested"]["err"] == pytest.approx([1e-4, 2e-4])
    assert metrics["missing"] is None  # NaN is not JSON
    assert path.exists()


def test_report_rejects_missing_caption_and_bad_tables():
    report = Report("x")
    with pytest.raises(DeepmorphValueError, match="caption"):
        report.add_figure(speed_bar({"a": 1.0}), "  ")
    with pytest.raises(DeepmorphValueError, match="length"):
        report.add_table({"a": [1, 2], "b": [1]})
    with pytest.raises(DeepmorphValueError):
        report.add_table(42)


def test_numbers_are_formatted_in_tables():
    report = Report("x")
    report.add_table({"rate": [1234.5678]}, formats={"rate": ",.1f"})
    report.add_table({"err": [math.pi * 1e-5]})
    html = report.to_html()
    assert re.search(r'<td class="num">1,234\.6</td>', html)
    assert '<td class="num">3.142e-05</td>' in html


def test_to_jsonable():
    assert to_jsonable({"a": np.int64(3), "b": [np.float64(np.inf)], "c": np.bool_(True)}) == {
        "a": 3, "b": [None], "c": True,
    }
