"""The README's table of contents matches its headings."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 _-]", "", heading.strip().lower()).replace(" ", "-")


def test_the_contents_link_every_section_and_only_real_headings():
    text = README.read_text()
    fenced = re.sub(r"```.*?```", "", text, flags=re.S)  # shell comments in code blocks are not headings
    headings = re.findall(r"^(#{2,3}) (.+)$", fenced, flags=re.M)
    anchors = {_slug(title) for _, title in headings}
    contents = fenced.split("## Contents", 1)[1].split("\n## ", 1)[0]
    links = re.findall(r"\]\(#([^)]+)\)", contents)
    assert links and not set(links) - anchors, set(links) - anchors
    sections = {_slug(title) for level, title in headings if level == "##" and title != "Contents"}
    assert sections <= set(links), sections - set(links)
