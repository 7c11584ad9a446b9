"""The README stays a landing page and every link in it and in docs/ leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

from sauce_export.recipe import recipe_help

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages written on other branches at the same time as a link to them (none at present).
PENDING: set[str] = set()


def _anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def _broken(page: Path) -> list[str]:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if file.relative_to(ROOT).as_posix() in PENDING:
            continue
        if not file.exists() or (anchor and anchor not in _anchors(file)):
            broken.append(target)
    return broken


def test_readme_is_a_landing_page() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_links_resolve() -> None:
    assert {p.name: _broken(p) for p in PAGES if _broken(p)} == {}


def test_recipe_reference_is_recipe_help() -> None:
    text = (ROOT / "docs" / "recipe.md").read_text()
    assert re.search(r"```text\n(.*?)\n```", text, re.S)[1].splitlines() == recipe_help()
