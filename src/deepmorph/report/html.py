"""One self-contained HTML report per run, plus a JSON file of its metrics.

A :class:`Report` collects sections (headings), paragraphs, figures and tables, then
:meth:`Report.write` renders one HTML file with every figure embedded as a base64 PNG (no
external files, scripts or style sheets: the file can be mailed or archived alone) and
writes ``metrics.json`` next to it. Both are written to a temporary name and renamed, so a
reader never sees half a file.

>>> from deepmorph.report import Report
>>> report = Report("Demo")
>>> report.section("1. Numbers")
>>> report.add_table({"survey": ["a", "b"], "rate [stamps/s]": [1200.0, 800.0]}, caption="Speeds.")
>>> report.metrics["rate"] = 1200.0
>>> html = report.to_html()
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from deepmorph import __version__
from deepmorph.errors import DeepmorphValueError

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1150px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption, caption { font-size: .92em; color: #333; text-align: left; margin: .4em 0; }
table { border-collapse: collapse; margin: 1em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
nav ol { columns: 2; }
.meta { color: #666; font-size: .85em; }
"""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _format(value, fmt: str | None = None) -> tuple[str, bool]:
    """Text of one table cell and whether it is numeric."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)), False
    if isinstance(value, (int, np.integer)):
        return (format(int(value), fmt) if fmt else str(int(value))), True
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return "NaN" if math.isnan(v) else str(v), True
        return format(v, fmt or ".4g"), True
    return str(value), False


def _table_columns(table) -> tuple[list[str], list[list]]:
    """Header and rows of an astropy Table, a dict of columns, a dict of scalars or a list of row dicts."""
    if hasattr(table, "colnames") and hasattr(table, "columns"):  # astropy Table: units in the header
        heads = []
        for name in table.colnames:
            unit = getattr(table[name], "unit", None)
            heads.append(f"{name} [{unit}]" if unit not in (None, "") else name)
        rows = [[row[name] for name in table.colnames] for row in table]
        return heads, rows
    if isinstance(table, Mapping):
        values = list(table.values())
        if values and all(isinstance(v, (Sequence, np.ndarray)) and not isinstance(v, str) for v in values):
            lengths = {len(v) for v in values}
            if len(lengths) != 1:
                raise DeepmorphValueError(f"table columns differ in length: {sorted(lengths)}")
            return [str(k) for k in table], [list(r) for r in zip(*values, strict=True)]
        return ["quantity", "value"], [[k, v] for k, v in table.items()]
    if isinstance(table, Sequence) and all(isinstance(r, Mapping) for r in table):
        heads = list(dict.fromkeys(k for r in table for k in r))
        return [str(h) for h in heads], [[r.get(h, "") for h in heads] for r in table]
    raise DeepmorphValueError(
        f"a table must be an astropy Table, a dict of columns or scalars, or a list of dicts; got {type(table)!r}"
    )


def to_jsonable(value):
    """``value`` with numpy scalars and arrays turned into Python numbers and lists, NaN and inf into None."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class Report:
    """Build one self-contained HTML report.

    Parameters
    ----------
    title : str
        Page title (``<h1>``).
    intro : str, optional
        Paragraph under the title.
    figure_dir : str or Path, optional
        If given, every figure is also saved there as ``<name>.png``.
    dpi : int
        Resolution of the PNGs, dots per inch.

    Attributes
    ----------
    metrics : dict
        Numbers of the run (nested dicts allowed); written to the JSON file by :meth:`write`.
    figures : list of dict
        ``name``, ``caption`` and ``path`` (or None) of every figure added.
    """

    def __init__(self, title: str, intro: str | None = None, figure_dir: str | Path | None = None, dpi: int = 100):
        self.title = str(title)
        self.metrics: dict = {}
        self.figures: list[dict] = []
        self.figure_dir = Path(figure_dir) if figure_dir is not None else None
        self.dpi = int(dpi)
        self._blocks: list[str] = []
        self._sections: list[tuple[str, str]] = []
        if intro:
            self.add_text(intro)

    # -- content ------------------------------------------------------------------------------
    def section(self, heading: str, text: str | None = None, level: int = 2) -> None:
        """Start a section: a heading (``<h2>``, or ``<h3>`` with ``level=3``) listed in the contents."""
        if level not in (2, 3):
            raise DeepmorphValueError(f"section level must be 2 or 3, got {level}")
        anchor = _slug(heading)
        used = {a for a, _ in self._sections}
        base, k = anchor, 2
        while anchor in used:
            anchor, k = f"{base}-{k}", k + 1
        if level == 2:
            self._sections.append((anchor, heading))
        else:
            self._sections.append((anchor, "\u2003" + heading))
        self._blocks.append(f'<h{level} id="{anchor}">{html.escape(heading)}</h{level}>')
        if text:
            self.add_text(text)

    def add_text(self, text: str) -> None:
        """A paragraph of plain text (escaped; blank lines split paragraphs)."""
        for para in re.split(r"\n\s*\n", str(text).strip()):
            self._blocks.append(f"<p>{html.escape(para)}</p>")

    def add_figure(self, fig, caption: str, name: str | None = None) -> Path | None:
        """Embed a matplotlib Figure as a base64 PNG with its caption.

        Parameters
        ----------
        fig : matplotlib.figure.Figure
            The figure; it is rendered once, at :attr:`dpi`.
        caption : str
            What the figure shows and the numbers behind it (required, non-empty).
        name : str, optional
            File stem for the copy in :attr:`figure_dir` (default ``figure-<k>``).

        Returns
        -------
        Path or None
            The PNG written to :attr:`figure_dir`, if any.
        """
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=self.dpi)
        return self._embed(buf.getvalue(), caption, name)

    def add_image(self, path: str | Path, caption: str, name: str | None = None) -> Path | None:
        """Embed a PNG file (e.g. a figure a workflow saved in its run directory) with its caption.

        Parameters are those of :meth:`add_figure`, with ``path`` the PNG file.
        """
        try:
            png = Path(path).read_bytes()
        except OSError as exc:
            raise DeepmorphValueError(f"{path}: cannot read the figure ({exc.strerror or exc})") from None
        if not png.startswith(b"\x89PNG"):
            raise DeepmorphValueError(f"{path}: not a PNG file")
        return self._embed(png, caption, name)

    def _embed(self, png: bytes, caption: str, name: str | None) -> Path | None:
        if not str(caption).strip():
            raise DeepmorphValueError("every figure needs a caption saying what it shows")
        number = len(self.figures) + 1
        name = _slug(name) if name else f"figure-{number}"
        path = None
        if self.figure_dir is not None:
            self.figure_dir.mkdir(parents=True, exist_ok=True)
            path = self.figure_dir / f"{name}.png"
            path.write_bytes(png)
        data = base64.b64encode(png).decode("ascii")
        self._blocks.append(
            f'<figure id="fig-{name}"><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>Figure {number}.</b> {html.escape(str(caption))}</figcaption></figure>"
        )
        self.figures.append({"name": name, "caption": str(caption), "path": path})
        return path

    def add_table(self, table, caption: str | None = None, formats: Mapping[str, str] | None = None) -> None:
        """Add a table.

        Parameters
        ----------
        table : astropy.table.Table, dict or list of dict
            An astropy Table (units go into the header), a dict of equal-length columns,
            a dict of scalars (shown as quantity / value rows) or a list of row dicts.
        caption : str, optional
            Shown above the table.
        formats : dict, optional
            Column name -> format spec (e.g. ``".3f"``); floats default to ``".4g"``.
        """
        heads, rows = _table_columns(table)
        formats = dict(formats or {})
        keys = list(table.colnames) if hasattr(table, "colnames") else heads
        out = ["<table>"]
        if caption:
            out.append(f"<caption>{html.escape(str(caption))}</caption>")
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in heads) + "</tr>")
        for row in rows:
            cells = []
            for key, value in zip(keys, row, strict=True):
                text, numeric = _format(value, formats.get(key))
                cls = ' class="num"' if numeric else ""
                cells.append(f"<td{cls}>{html.escape(text)}</td>")
            out.append("<tr>" + "".join(cells) + "</tr>")
        out.append("</table>")
        self._blocks.append("\n".join(out))

    # -- output -------------------------------------------------------------------------------
    def to_html(self) -> str:
        """The whole page as one string."""
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        nav = ""
        if self._sections:
            items = "".join(f'<li><a href="#{a}">{html.escape(t)}</a></li>' for a, t in self._sections)
            nav = f"<nav><b>Contents</b><ol>{items}</ol></nav>"
        body = "\n".join(self._blocks)
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(self.title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<h1>{html.escape(self.title)}</h1>\n"
            f'<p class="meta">deepmorph {__version__}, written {stamp}; {len(self.figures)} figures. '
            "Metrics in metrics.json next to this file.</p>\n"
            f"{nav}\n{body}\n</body>\n</html>\n"
        )

    def write(self, path: str | Path, metrics_name: str = "metrics.json") -> Path:
        """Write the HTML to ``path`` and :attr:`metrics` as JSON next to it, atomically.

        Parameters
        ----------
        path : str or Path
            The HTML file (parent folders are created).
        metrics_name : str
            File name of the JSON, in the same folder.

        Returns
        -------
        Path
            ``path``.
        """
        path = Path(path)
        text = json.dumps(to_jsonable(self.metrics), indent=2, allow_nan=False)
        _atomic_write(path.with_name(metrics_name), text + "\n")
        _atomic_write(path, self.to_html())
        return path


__all__ = ["Report", "to_jsonable"]
