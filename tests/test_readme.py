"""The README's Python example runs as written (Scientific Python habit: docs executed by the tests)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should show a Python example"
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    batch = namespace["batch"]
    assert batch["images"].shape == (16, 1, 64, 64)
    assert {"noiseless", "bulge", "disk", "clump_mask", "catalog"} <= set(batch)
    assert "(16, 1, 64, 64)" in capsys.readouterr().out


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text


def test_readme_commands_parse():
    """Every `deepmorph ...` line of the README's shell examples is a valid command line."""
    import shlex

    from deepmorph.cli import build_parser

    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("deepmorph ")]
    assert len(commands) >= 20
    for argv in commands:
        args = build_parser().parse_args(argv)
        assert callable(args.handler), argv
