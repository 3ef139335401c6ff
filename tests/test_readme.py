"""The README's settings table is generated from the Settings class and must not drift."""

from __future__ import annotations

from pathlib import Path

from tokenaudit.settings import settings_table_markdown

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_starts_with_the_two_commands():
    head = README.read_text().split("```", 2)[1]
    assert "make demo" in head and "make test" in head


def test_settings_table_in_sync():
    text = README.read_text()
    block = text.split("<!-- settings:start -->", 1)[1].split("<!-- settings:end -->", 1)[0]
    assert block.strip() == settings_table_markdown().strip(), "README settings table is stale: run `make docs`"
