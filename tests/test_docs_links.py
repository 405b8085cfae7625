"""README.md and docs/*.md link to files and headings that exist (a moved section or a renamed RESULTS heading breaks
a newcomer's first page silently otherwise). Anchors follow GitHub's heading slugs."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]*)(#[^)\s]*)?\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # '# comments' in code blocks are not headings
    return {slug(h) for h in re.findall(r"^#{1,6} (.*)$", text, re.M)}


def test_slug_matches_github():
    assert slug("Decode speed (speed-16k)") == "decode-speed-speed-16k"
    assert slug("What `rank` and `Budget` mean") == "what-rank-and-budget-mean"
    assert slug("domains-e8-refine64: 6.25 % bits") == "domains-e8-refine64-625--bits"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for m in LINK.finditer(page.read_text()):
        path, anchor = m[1], m[2]
        if path.startswith(("http://", "https://", "mailto:")):
            continue
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{path}: no such file")
        elif anchor and target.suffix == ".md" and anchor[1:] not in anchors(target):
            broken.append(f"{path}{anchor}: no such heading")
    assert not broken, f"{page.relative_to(ROOT)} links to what does not exist: {broken}"
