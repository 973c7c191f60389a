"""The README's Python snippet runs as written (it is the library API researchers use from a notebook)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_python_snippet_runs(capsys):
    section = README.read_text().split("## From Python", 1)[1]
    [code] = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:1]
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert any(" tokens/s | first token " in line for line in out)
    assert len([line for line in out if " tokens/s " in line and line.startswith("'")]) == 3
