"""Reports: figures (pure functions from arrays and tables to matplotlib Figures) and one
self-contained HTML page per run with a JSON file of its metrics.

Nothing here simulates, trains or loads checkpoints: callers hand in arrays and tables.
"""

from deepmorph.report.figures import (
    GALLERY_ROWS,
    asinh_stretch,
    new_figure,
    parameter_distributions,
    residual_figure,
    speed_bar,
    stamp_gallery,
)
from deepmorph.report.html import Report, to_jsonable

__all__ = [
    "GALLERY_ROWS", "Report", "asinh_stretch", "new_figure", "parameter_distributions", "residual_figure",
    "speed_bar", "stamp_gallery", "to_jsonable",
]
