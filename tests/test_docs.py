"""The repository explains itself: what the code and README cite is in docs/, and nothing points outside it."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/([a-z_-]+\.md)(?: §(\d+))?")
# What a clone does not have: the project's notes from before it had docs/ of its own. Spelled in pieces, so
# this file does not itself hold what it looks for.
SECTION = " §"
OUTSIDE_MARKERS = ("../" + "shared", "design" + SECTION, "paper-notes" + SECTION)
OUTSIDE = re.compile("|".join(re.escape(marker) for marker in OUTSIDE_MARKERS))


def _tracked() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if n.endswith((".py", ".md", ".yaml", ".yml", ".toml", ".sh")) or
            n in ("Makefile", ".ci/run")]


def _sections(doc: Path) -> set[str]:
    return set(re.findall(r"^#+ §(\d+)\b", doc.read_text(), flags=re.M))


@pytest.fixture(scope="module")
def texts() -> dict[Path, str]:
    """Every tracked text file but this one, whose examples are wrong on purpose."""
    return {path: path.read_text(errors="replace") for path in _tracked()
            if path.is_file() and path != Path(__file__).resolve()}


def _outside_references(texts: dict[Path, str]) -> list[str]:
    return [f"{p.name}:{n}" for p, t in texts.items() for n, line in enumerate(t.splitlines(), 1)
            if OUTSIDE.search(line)]


def _broken_citations(texts: dict[Path, str]) -> list[str]:
    broken = []
    for path, text in texts.items():
        for name, section in CITATION.findall(text):
            doc = ROOT / "docs" / name
            if not doc.is_file() or (section and section not in _sections(doc)):
                broken.append(f"{path.name}: docs/{name}{' §' + section if section else ''}")
    return broken


def test_nothing_refers_to_files_outside_the_repository(texts):
    assert _outside_references(texts) == []


def test_every_docs_citation_names_a_file_and_section_that_exist(texts):
    assert _broken_citations(texts) == []
    assert sum(len(CITATION.findall(t)) for t in texts.values()) > 50  # the code does cite docs/


def test_the_checks_see_a_bad_citation_and_an_outside_reference():
    texts = {Path("a.py"): "see docs/study.md §1 and docs/study.md §9\nand docs/nowhere.md",
             Path("b.md"): f"details in {OUTSIDE_MARKERS[0]}/design.md\n({OUTSIDE_MARKERS[2]}3)"}
    assert _broken_citations(texts) == ["a.py: docs/study.md §9", "a.py: docs/nowhere.md"]
    assert _outside_references(texts) == ["b.md:1", "b.md:2"]
