"""The README's Python snippet runs as written (it is the library API researchers use from a notebook)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_python_snippets_run(capsys):
    section = README.read_text().split("## From Python", 1)[1].split("\n## ", 1)[0]
    generator, through_generate = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    names = {}
    exec(compile(generator, "README.md", "exec"), names)
    out = capsys.readouterr().out.splitlines()
    assert any(" tokens/s | first token " in line for line in out)
    assert len([line for line in out if " tokens/s " in line and line.startswith("'")]) == 3
    exec(compile(through_generate, "README.md", "exec"), names)  # the second goes on with the first's model
    assert capsys.readouterr().out.startswith("True [")  # model.generate's own tokens
