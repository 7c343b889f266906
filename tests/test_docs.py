"""BENCHMARKS.md is navigable: every benchmark script names the section its figures go to and prints the rows of a
Markdown table to paste there, every row of the "Current figures" index points at a section that exists, and every link
into BENCHMARKS.md (from the README or within the file) names one of its headings."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = (ROOT / "BENCHMARKS.md").read_text()
SECTIONS = {line.lstrip("#").strip() for line in BENCHMARKS.splitlines() if line.startswith("#")}
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))
FIGURES_LINE = re.compile(r'Figures: BENCHMARKS\.md, section "([^"]+)"\.')


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_each_benchmark_script_names_an_existing_section(script: Path):
    docstring = ast.get_docstring(ast.parse(script.read_text())) or ""
    named = FIGURES_LINE.findall(docstring)
    assert named, f'{script.name}: its docstring says no \'Figures: BENCHMARKS.md, section "..."\''
    assert all(name in SECTIONS for name in named), f"{script.name} names {named}, not a section of BENCHMARKS.md"


def test_every_current_figure_points_at_a_section():
    index = BENCHMARKS.split("## Current figures", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in index.splitlines() if line.startswith("| ") and not line.startswith("| figure")]
    assert len(rows) >= 15
    for row in rows:
        section = row.rstrip(" |").rsplit("|", 1)[1].strip()
        assert section in SECTIONS, f"the index row {row[:60]!r} points at {section!r}, which is no section"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_each_benchmark_script_prints_the_rows_of_a_markdown_table(script: Path):
    source = script.read_text()
    assert "|---" in source, f"{script.name} prints no table rows to paste into its BENCHMARKS.md section"


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("document", ["README.md", "BENCHMARKS.md"])
def test_links_into_benchmarks_name_a_heading(document: str):
    text = (ROOT / document).read_text()
    prefix = r"(?:BENCHMARKS\.md)" if document == "README.md" else r"(?:BENCHMARKS\.md)?"
    anchors = re.findall(r"\(" + prefix + r"#([^)\s]+)\)", text)
    assert document == "BENCHMARKS.md" or anchors, "the README links no BENCHMARKS.md section"
    existing = {github_anchor(name) for name in SECTIONS}
    assert not [a for a in anchors if a not in existing], f"{document} links sections that do not exist"
