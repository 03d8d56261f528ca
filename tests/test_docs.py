"""The Python examples of the README and docs/ run as written: a renamed function or argument fails here, not in
a reader's notebook."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# a ```python block, also ```py or ```Python and one indented under a list item (to the end of its own fence): such a
# block was left out, so a broken example there passed
_BLOCK = re.compile(r"^([ \t]*)```[ \t]*(?:python3?|py)[ \t]*\n(.*?)^\1```[ \t]*$", re.S | re.M | re.I)


def python_blocks() -> list[tuple[str, int, str]]:
    """``(file, line of the block's first code line, code)`` of every ```python block of the docs."""
    blocks = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start(2)) + 1
            blocks.append((str(doc.relative_to(REPO)), line, textwrap.dedent(match.group(2))))
    return blocks


BLOCKS = python_blocks()


def test_every_kind_of_python_block_is_found(tmp_path, monkeypatch):
    # a ```py block and one indented under a list item were skipped: a broken example there passed
    page = tmp_path / "page.md"
    page.write_text("# A page\n\n```python\na = 1\n```\n\n```py\nb = 2\n```\n\n- an item:\n\n  ```Python\n  c = 3\n"
                    "  if c:\n      d = 4\n  ```\n\n```bash\necho no\n```\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "DOCS", [page])
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert python_blocks() == [("page.md", 4, "a = 1\n"), ("page.md", 8, "b = 2\n"),
                               ("page.md", 14, "c = 3\nif c:\n    d = 4\n")]


def test_the_python_api_page_has_its_examples():
    # the extraction itself must find the page's blocks, or every test below would pass by running nothing
    assert len([b for b in BLOCKS if b[0] == "docs/python_api.md"]) >= 5


@pytest.mark.parametrize("doc, line, code", BLOCKS, ids=[f"{doc}:{line}" for doc, line, _ in BLOCKS])
def test_a_python_example_of_the_docs_runs(doc, line, code):
    # each block on its own, as a reader copies it; compiled under its file and line, so a failure points there.
    # The global random state is the test process's own: an example that seeds it leaves the next test unchanged
    compiled = compile("\n" * (line - 1) + code, f"{REPO / doc}", "exec")
    with torch.random.fork_rng(devices=[]):
        exec(compiled, {"__name__": "__docs__"})
