"""What every CLI error test checks: one ``deepmorph: error: ...`` line on stderr, no traceback."""

from __future__ import annotations


def error_line(capsys) -> str:
    """The single stderr line of a failed command (and no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("deepmorph: error: ")
    return lines[0]
