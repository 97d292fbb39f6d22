"""The documents' relative links lead somewhere: every file a link in README.md, BENCHMARKS.md or
docs/*.md names exists, and every `#anchor` is a heading of the file it points into (as GitHub
makes anchors), so moving a section or a file cannot leave a dead link behind unnoticed."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    headings = re.findall(r"^#{1,6} +(.+?) *$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]  # http:, https:, mailto:


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_an_existing_file_and_heading(doc):
    for target in links(doc):
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.name}: link to {target}: no such file"
        if anchor and path.suffix == ".md":
            assert anchor in anchors(path), f"{doc.name}: link to {target}: no such heading"


def test_links_and_anchors_are_read_as_github_reads_them(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("# Attention backends (`--attention`)\n## Sharing: samples, beams\n```\n# not a heading\n"
                   "[in code](nowhere.md)\n```\nSee [a](docs/a.md#b), ![img](assets/p.png) and [web](https://x.org).\n")
    assert anchors(doc) == {"attention-backends---attention", "sharing-samples-beams"}
    assert links(doc) == ["docs/a.md#b", "assets/p.png"]
