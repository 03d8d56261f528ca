"""The Python examples of the README and docs/ run as written: a renamed function or argument fails here, not in
a reader's notebook."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[tuple[str, int, str]]:
    """``(file, line of the block's first code line, code)`` of every ```python block of the docs."""
    blocks = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start(1)) + 1
            blocks.append((str(doc.relative_to(REPO)), line, match.group(1)))
    return blocks


BLOCKS = python_blocks()


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
