"""Every section of README.md or docs/ that the code names (docs/x.md, "Heading") exists:
a section renamed or moved to another page leaves no docstring or comment pointing nowhere."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pipeline", "consumers", "producers", "tests")

# A page, then the section's heading in quotes: `docs/x.md, "Heading"` or `README.md ("Heading")`.
_REFERENCE = re.compile(r'(README\.md|docs/[\w-]+\.md)(?:,\s*|\s*\(\s*)"([^"]+)"')
# A reference may wrap onto the next line of a docstring or of a comment.
_WRAP = re.compile(r"\s*\n\s*(?:#\s*)?")


def _sections(page: Path) -> set[str]:
    """The page's headings, and the bold leads of its paragraphs (``**The lead.** ...``)."""
    sections = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            # "### ... SIGTERM" continues its parent's sentence: named without the dots.
            sections.add(line.lstrip("#").strip().removeprefix("... "))
        elif lead := re.match(r"\*\*(.+?)\.?\*\*", line):
            sections.add(lead.group(1))
    return sections


def references() -> list[tuple[str, str, str]]:
    """(source file, page, heading) of every reference in the project's Python files."""
    found = []
    for top in SOURCES:
        for path in sorted((ROOT / top).rglob("*.py")):
            if path == Path(__file__).resolve():
                continue
            text = _WRAP.sub(" ", path.read_text(encoding="utf-8"))
            for page, heading in _REFERENCE.findall(text):
                found.append((str(path.relative_to(ROOT)), page, heading))
    return found


def test_the_code_names_sections_of_readme_and_docs() -> None:
    assert references(), "the pattern finds no reference: it is broken"


def test_every_section_the_code_names_exists() -> None:
    missing = [
        f'{source}: {page}, "{heading}"'
        for source, page, heading in references()
        if not (ROOT / page).is_file() or heading not in _sections(ROOT / page)
    ]
    assert missing == []
