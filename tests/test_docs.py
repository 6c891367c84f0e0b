"""docs/reference.md is generated from the code; it must say what the code says now."""

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
