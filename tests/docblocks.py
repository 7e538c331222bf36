"""The fenced code blocks of README.md and docs/*.md, found by page and section heading.

Every ``sh``, ``python`` and ``yaml`` block is either run by a test or exempt: the line
right above an exempt block is an HTML comment ``<!-- not run: REASON -->``. ``RUN_BY``
below names, for each test that runs blocks, the blocks it runs; a block is keyed by its
page, the heading of its section and its position among that section's blocks of the
same language (exempt ones counted). ``yaml`` blocks are all run by one test in
tests/test_docs.py. ``text`` blocks are output or usage lines, not code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parent.parent
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))]
CODE = {"sh", "python", "yaml"}  # blocks that must run or say why not
NOT_CODE = {"text"}
NOT_RUN = re.compile(r"^<!-- not run: (?P<reason>.*\S.*?) -->$")

EVALUATION = "Evaluation: `wcl linear-eval`, `wcl knn-eval`, `wcl finetune`"
WEIGHTS = "Weights: `wcl convert`, `wcl export`, `wcl embed`"
OWN_IMAGES = "Pre-train on your own images"
# The test that runs a block -> the blocks it runs, as (page, section, language, position).
RUN_BY = {
    "test_the_2_epoch_example_writes_a_checkpoint": [
        ("README.md", "Pre-training", "sh", 0),
        ("docs/pretraining.md", "Pre-training: `wcl pretrain`", "sh", 0),
    ],
    "test_the_multi_crop_example_trains": [("docs/pretraining.md", "Multi-crop", "sh", 1)],
    "test_own_images_commands_run_from_another_directory": [
        ("docs/own-images.md", OWN_IMAGES, "sh", 0),
        ("docs/own-images.md", OWN_IMAGES, "python", 0),
    ],
    "test_evaluation_and_report_commands_on_the_example_run": [
        ("docs/evaluation.md", EVALUATION, "sh", 0),
        ("docs/evaluation.md", "Reports: `wcl report` and `wcl demo`", "sh", 0),
    ],
    "test_export_and_embed_commands_on_the_example_run": [("docs/weights.md", WEIGHTS, "sh", 0)],
    "test_loading_a_trained_backbone": [
        ("docs/python-api.md", "A trained backbone in plain PyTorch", "python", 0)
    ],
    "test_wcl_steps_in_your_own_loop": [
        ("docs/python-api.md", "WCL's training step in your own loop", "python", 0)
    ],
}
RUN = {key: test for test, keys in RUN_BY.items() for key in keys}


@dataclass(frozen=True)
class Block:
    page: str  # path from the repository root
    section: str  # the heading above the block, without its #s
    lang: str  # the fence's info string
    position: int  # among the section's blocks of this language
    line: int  # of the opening fence, 1-based
    code: str
    not_run: str | None  # the reason given in a "not run" comment, if any

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.page, self.section, self.lang, self.position)

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.section!r}, {self.lang} #{self.position})"


def blocks(page: str) -> list[Block]:
    """Every fenced block of a page, in order."""
    lines = (ROOT / page).read_text().splitlines()
    found: list[Block] = []
    counts: dict[tuple[str, str], int] = {}
    section, i = "", 0
    while i < len(lines):
        line = lines[i]
        heading = re.match(r"#+ (.+)$", line)
        if heading:
            section = heading.group(1).strip()
        fence = re.match(r"(\s*)```(\S*)\s*$", line)
        if fence:
            indent, lang = fence.groups()
            end = i + 1
            while not re.match(rf"{indent}```\s*$", lines[end]):
                end += 1
            code = "\n".join(x[len(indent) :] for x in lines[i + 1 : end]) + "\n"
            above = NOT_RUN.match(lines[i - 1].strip()) if i else None
            position = counts.get((section, lang), 0)
            counts[section, lang] = position + 1
            reason = above.group("reason") if above else None
            found.append(Block(page, section, lang, position, i + 1, code, reason))
            i = end
        i += 1
    return found


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in blocks(page)]


def block(page: str, section: str, lang: str, position: int = 0) -> str:
    """The code of a block that RUN lists as run by a test."""
    key = (page, section, lang, position)
    assert key in RUN, f"{key} is not listed in tests/docblocks.py RUN"
    found = [b for b in blocks(page) if b.key == key]
    assert found, f"{page} has no {lang} block #{position} under the heading {section!r}"
    return found[0].code
