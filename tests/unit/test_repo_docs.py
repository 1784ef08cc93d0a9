"""The repository stands on its own: the README's and docs' links resolve to files (and
headings) inside it, and LICENSE is the license pyproject declares."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_and_docs_links_stay_inside_the_repo() -> None:
    checked = 0
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(doc.read_text()):
            assert "://" not in target and not target.startswith("mailto:"), \
                f"{doc.name}: {target} points outside the repository"
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert file.is_relative_to(ROOT), f"{doc.name}: {target} leaves the repository"
            assert file.exists(), f"{doc.name}: {target} does not exist"
            if anchor:
                headings = {_anchor(h) for h in
                            re.findall(r"^#+ (.+)$", file.read_text(), re.MULTILINE)}
                assert anchor in headings, f"{doc.name}: no heading #{anchor} in {path}"
            checked += 1
    assert checked >= 8


def test_license_file_matches_pyproject() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert declared == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
