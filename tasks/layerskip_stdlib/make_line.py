"""Writes stdlib_line.jsonl: next-line completions from standard-library files the embedded model never trained on.

    python tasks/layerskip_stdlib/make_line.py      # from the repository root; rewrites the file beside this one

The files are those held out by name from its training (`corpus.is_held_out` at the training run's 5%). A document
is a line of code of 8 to 60 characters (no comment, not in or starting a string) after a line that is not blank:
its target is a newline and that line (indentation included), its context the 20 lines before it (ending at the
end of a line). At most two lines per file; a line whose two-line window also occurs in a training file (a
vendored copy) is left out. Shuffled with a fixed seed: the same Python version gives the same file.
"""

import io
import json
import random
import sys
import sysconfig
import tokenize
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from training import corpus  # noqa: E402

HELDOUT_FRACTION = 0.05  # models/layerskip-stdlib/training.json
CONTEXT_LINES, PER_FILE, DOCUMENTS, SEED = 20, 2, 48, 0


def in_strings(text: str) -> set[int]:
    """The 0-based numbers of the lines a string continues on (docstrings' prose, mostly)."""
    inside = set()
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.STRING:
                inside.update(range(token.start[0], token.end[0]))  # rows are 1-based: the lines after its first
    except (tokenize.TokenError, SyntaxError):
        return set(range(text.count("\n") + 1))
    return inside


def candidates(name: str, text: str) -> list[dict]:
    lines, strings = text.split("\n"), in_strings(text)
    found = []
    for i in range(CONTEXT_LINES // 2, len(lines)):
        line, before = lines[i], lines[i - 1]
        body = line.strip()
        if not 8 <= len(body) <= 60 or i in strings or body.startswith(("'", '"')) or "#" in line:
            continue
        if line != line.rstrip() or not before.strip() or before != before.rstrip() or "\t" in line:
            continue
        found.append({"context": "\n".join(lines[max(0, i - CONTEXT_LINES):i]), "target": "\n" + line,
                      "source": f"{name}:{i + 1}"})
    return found


def main() -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    named = [(p.relative_to(root).as_posix(), p) for p in corpus.stdlib_files()]
    heldout = [(n, p.read_text(encoding="utf-8", errors="replace")) for n, p in named
               if corpus.is_held_out(n, HELDOUT_FRACTION)]
    pool = [c for name, text in heldout for c in candidates(name, text)]
    random.Random(SEED).shuffle(pool)
    held_names = {n for n, _ in heldout}
    training = "\0".join(text for name, text in corpus.read_documents(
        [(n, p) for n, p in named if n not in held_names] + corpus.NAMED_SOURCES["site-packages"]()))
    per_file, chosen = Counter(), []
    for c in pool:
        file = c["source"].rsplit(":", 1)[0]
        if per_file[file] >= PER_FILE or c["context"].rsplit("\n", 1)[-1] + c["target"] in training:
            continue
        per_file[file] += 1
        chosen.append(c)
        if len(chosen) == DOCUMENTS:
            break
    (HERE / "stdlib_line.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chosen))
    print(f"{len(chosen)} documents from {len(per_file)} of {len(heldout)} held-out files", file=sys.stderr)


if __name__ == "__main__":
    main()
