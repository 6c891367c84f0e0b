"""docs/reference.md is generated from the code; it must say what the code says now."""

import re
import runpy
from pathlib import Path

DOCS = Path(__file__).parents[1] / "docs"


def test_reference_page_matches_config_and_cli():
    generator = runpy.run_path(str(DOCS / "make_reference.py"))
    assert (DOCS / "reference.md").read_text() == generator["render"](), (
        "docs/reference.md is stale: run `python docs/make_reference.py`"
    )


def test_reference_page_lists_every_config_key_with_its_limits():
    page = (DOCS / "reference.md").read_text()
    assert "| time_budget | float | 0.0 | >= 0.0, <= 604800 |" in page
    assert "| amp | str | 'auto' | auto \\| bf16 \\| fp16 \\| off |" in page
    assert "`--resume`" in page


def test_the_suites_and_recipes_the_docs_run_are_shipped():
    """A command copied from the docs does not end in 'unknown suite' or 'unknown recipe'."""
    from cifarlab.config import list_recipes
    from cifarlab.suites import list_suites

    text = "\n".join(p.read_text() for p in [DOCS.parent / "README.md", *DOCS.glob("*.md")])
    name = r"([a-z0-9][a-z0-9-]*)(?![\w.-])"  # not a placeholder (exercise-N) or a file
    assert set(re.findall(r"cifarlab suite " + name, text)) - set(list_suites()) == set()
    assert (
        set(re.findall(r"cifarlab [^`\n]*?--recipe " + name, text)) - set(list_recipes()) == set()
    )
