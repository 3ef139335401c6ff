"""The docs stay true to the code: every generated block is current, every relative link
lands on a file (and heading), the README stays short and the contributor pages exist.

No broker, store or model: the blocks are rendered from declarations (tokenaudit/docs_gen.py).
docs/models.md, generated from transformers' TF mappings, is checked by
tests/test_inference_families.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tokenaudit import docs_gen

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# [text](target) outside code: a target with a scheme or only an anchor is not a file
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


def _anchors(page: Path) -> set[str]:
    """The anchors a renderer makes of a page's headings (GitHub's rule: lower case, keep
    letters, digits, spaces, hyphens and underscores, spaces become hyphens)."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def _markdown_pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md"]


def test_every_generated_block_is_current():
    stale = docs_gen.stale(ROOT)
    assert not stale, f"stale generated docs: {sorted(str(p.relative_to(ROOT)) for p in stale)}; run `make docs`"


def test_each_declaration_has_its_block_somewhere():
    text = "\n".join(p.read_text() for p in docs_gen.pages(ROOT))
    missing = [name for name in docs_gen.BLOCKS if f"<!-- {name}:start -->" not in text]
    assert not missing, f"generated blocks no page holds: {missing}"


def test_a_stale_block_is_rewritten_and_an_unknown_one_refused():
    page = "before\n<!-- topics:start -->\nold rows\n<!-- topics:end -->\nafter\n"
    new = docs_gen.render(page)
    assert "old rows" not in new and "`token-usage`" in new and new.endswith("after\n")
    assert docs_gen.render(new) == new
    with pytest.raises(KeyError, match="unknown generated block"):
        docs_gen.render("<!-- nosuch:start -->\n<!-- nosuch:end -->\n")


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text) < 10_000, f"README.md has {len(text)} characters; move detail to docs/"
    head = text.split("```", 2)[1]
    assert "make demo" in head and "make test" in head


@pytest.mark.parametrize("page", _markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(page: Path):
    broken = []
    for target in _LINK.findall(_CODE.sub("", page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue
        if target.startswith("#"):
            target = page.name + target
        path, _, anchor = target.partition("#")
        file = page.parent / path
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in _anchors(file)):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files or headings: {broken}"


def test_contributing_and_changelog_exist():
    assert (ROOT / "CONTRIBUTING.md").is_file()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog") and "## Unreleased" in changelog
