"""The docs point at things that exist (relative links, the tests and test files they
name), every code block in them runs or says why not, their YAML loads as a config, the
key tables name every config key, and they describe the project, not its making."""

import re
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import pytest
import yaml
from docblocks import CODE, NOT_CODE, PAGES, RUN, RUN_BY, all_blocks, blocks

ROOT = Path(__file__).parent.parent
DOCS = [
    ROOT / "README.md",
    ROOT / "BENCHMARKS.md",
    ROOT / "CHANGELOG.md",
    *sorted((ROOT / "docs").glob("*.md")),
]


def _prose(markdown: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^\s*```.*?^\s*```[ \t]*$", "", markdown, flags=re.M | re.S)


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a file's headings."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", _prose(markdown), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_relative_links_reach_files_and_headings():
    for doc in DOCS:
        text = _prose(doc.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            assert file.exists(), f"{doc.name}: link to missing {target}"
            if anchor and file.suffix == ".md":
                assert anchor in _anchors(file.read_text()), f"{doc.name}: no heading #{anchor}"


def test_named_tests_and_test_files_exist():
    from wcl.config import Config
    from wcl.eval.config import FinetuneConfig, KnnConfig, LinearConfig

    keys = set()  # config keys that look like test names (data.test_subset)
    for cls in (Config, LinearConfig, KnnConfig, FinetuneConfig):
        keys |= set().union(*config_keys(cls).values())
    defined = set()
    for test_file in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", test_file.read_text(), flags=re.M))
    for doc in DOCS:
        text = doc.read_text()
        for name in set(re.findall(r"`(?:tests/\w+\.py::)?(test_\w+)`", text)) - keys:
            assert name in defined, f"{doc.name} names {name}, which no test defines"
        # Names abbreviated with a leading "..." are suffixes of a named test.
        for suffix in re.findall(r"`\.\.\.(_\w+)`", text):
            assert any(n.endswith(suffix) for n in defined), f"{doc.name}: ...{suffix}"
        for path in re.findall(r"`(tests/test_\w+\.py)", text):
            assert (ROOT / path).is_file(), f"{doc.name} names {path}, which does not exist"


def test_every_code_block_runs_or_says_why_not():
    found = all_blocks()
    assert {b.page for b in found} >= {"README.md", "docs/pretraining.md"}
    for b in found:
        assert b.lang in CODE | NOT_CODE, f"{b}: fence without a known language ({b.lang!r})"
        if b.lang not in CODE or b.lang == "yaml":  # yaml: all run below
            continue
        if b.not_run:
            assert b.key not in RUN, f"{b} is marked 'not run' but {RUN[b.key]} runs it"
        else:
            assert b.key in RUN, f"{b}: no test runs it and no '<!-- not run: reason -->' above it"
    keys = {b.key for b in found}
    for key, test in RUN.items():
        assert key in keys, f"{test} runs {key}, which is no block of the docs"
    test_source = (ROOT / "tests" / "test_readme.py").read_text()
    for test in RUN_BY:
        assert f"def {test}(" in test_source, f"tests/test_readme.py has no {test}"


@pytest.mark.parametrize("page", PAGES)
def test_not_run_comments_sit_right_above_a_code_block(page):
    text = (ROOT / page).read_text()
    marked = {b.line - 1 for b in blocks(page) if b.not_run}  # the comment's line, 1-based
    for number, line in enumerate(text.splitlines(), 1):
        if "not run" in line and line.lstrip().startswith("<!--"):
            assert number in marked, f"{page}:{number}: a 'not run' comment above no block"


def test_yaml_blocks_load_as_configs(tmp_path):
    from wcl.config import load_config

    yaml_blocks = [b for b in all_blocks() if b.lang == "yaml"]
    assert yaml_blocks, "docs/pretraining.md shows a config file"
    for b in yaml_blocks:
        raw = yaml.safe_load(b.code)
        assert isinstance(raw, dict), b
        path = tmp_path / f"block-{b.line}.yaml"
        path.write_text(b.code)
        cfg = load_config(path)  # checked as `wcl pretrain --config` checks it
        for section, keys in raw.items():
            for key, value in keys.items() if isinstance(keys, dict) else ():
                assert getattr(getattr(cfg, section), key) == value, (b, section, key)


def config_keys(cls) -> dict[str, set[str]]:
    """{section: its keys} of a config dataclass."""
    return {name: {f.name for f in fields(hint)} for name, hint in get_type_hints(cls).items()}


@pytest.mark.parametrize(
    ("page", "region"),
    [("pretraining.md", "config-keys"), ("evaluation.md", "eval-config-keys")],
)
def test_config_key_tables_are_generated_from_the_declarations(page, region):
    """The key tables are wcl.config_docs' output (python -m wcl.config_docs --update ...),
    and every declared key is in one of them exactly once."""
    from wcl.config_docs import REGIONS, region_text

    text = (ROOT / "docs" / page).read_text()
    start, end = f"<!-- {region}:start -->", f"<!-- {region}:end -->"
    assert text.count(start) == 1 and text.count(end) == 1
    assert text[text.index(start) + len(start) + 1 : text.index(end)] == region_text(region), (
        f"run: python -m wcl.config_docs --update docs/{page}"
    )
    from wcl.config import Config
    from wcl.eval.config import FinetuneConfig, KnnConfig, LinearConfig

    classes = [Config] if region == "config-keys" else [LinearConfig, KnnConfig, FinetuneConfig]
    declared = {f"{s}.{k}" for cls in classes for s, keys in config_keys(cls).items() for k in keys}
    listed = re.findall(r"^\| `(\w+\.\w+)` \|", region_text(region), re.M)
    assert sorted(listed) == sorted(declared) and len(REGIONS[region][0]) > 1


def test_every_eval_key_is_named_in_the_evaluation_page():
    from wcl.eval.config import FinetuneConfig, KnnConfig, LinearConfig

    named = set(re.findall(r"`(?:\w+\.)?(\w+)`", (ROOT / "docs" / "evaluation.md").read_text()))
    for cls in (LinearConfig, KnnConfig, FinetuneConfig):
        for section, keys in config_keys(cls).items():
            assert not keys - named, (cls.__name__, section, keys - named)


def test_the_docs_describe_the_project_not_its_making():
    for doc in DOCS:
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            assert not re.search(r"\bsessions?\b", line, re.I), f"{doc.name}:{number}: {line}"
