"""The docs point at things that exist: relative links, and the tests they name."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a file's headings."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_relative_links_reach_files_and_headings():
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert file.exists(), f"{doc.name}: link to missing {target}"
            if anchor and file.suffix == ".md":
                assert anchor in _anchors(file.read_text()), f"{doc.name}: no heading #{anchor}"


def test_named_tests_exist():
    defined = set()
    for test_file in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", test_file.read_text(), flags=re.M))
    for doc in sorted((ROOT / "docs").glob("*.md")):  # README's test_* are config keys
        for name in re.findall(r"`(?:tests/\w+\.py::)?(test_\w+)`", doc.read_text()):
            assert name in defined, f"{doc.name} names {name}, which no test defines"
        # Names abbreviated with a leading "..." are suffixes of a named test.
        for suffix in re.findall(r"`\.\.\.(_\w+)`", doc.read_text()):
            assert any(n.endswith(suffix) for n in defined), f"{doc.name}: ...{suffix}"
