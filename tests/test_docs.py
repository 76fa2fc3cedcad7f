"""The documentation stays whole: every relative link in README.md and docs/ resolves (file and anchor), and
every shell script and every main.py subcommand is documented somewhere."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def strip_code(text: str) -> str:
    """Markdown without fenced code blocks (a `# comment` in a bash block is no heading, a link there no link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in strip_code(page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(strip_code(page.read_text())) if not re.match(r"[a-z]+:", t)]


def test_slug_rule() -> None:
    page = ROOT / "docs" / "faithfulness.md"
    assert "run-for-run-with-the-releases" in anchors(page)
    assert "the-authors-released-weights" in anchors(page)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"


def test_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, len(lines)
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in "\n".join(lines), f"README does not point to docs/{page.name}"


def documented_text() -> str:
    return "\n".join(p.read_text() for p in PAGES)


def test_every_shell_script_is_documented() -> None:
    text = documented_text()
    scripts = sorted(ROOT.glob("shell/*.sh")) + sorted(ROOT.glob("shell/slurm/*"))
    missing = [s.name for s in scripts if s.name not in text and s.name != "common.sh"]
    assert not missing, f"not documented: {missing}"


def test_every_subcommand_is_documented() -> None:
    commands = re.findall(r"@main\.command\(\s*\"([\w-]+)\"", (ROOT / "main.py").read_text())
    assert {"net", "dataset", "predict", "export", "segment"} <= set(commands)
    text = documented_text()
    missing = [c for c in commands if not re.search(rf"main\.py(\s+--?\S+(\s+[^\s-]\S*)?)*\s+{re.escape(c)}\b", text)]
    assert not missing, f"subcommands without a documented command line: {missing}"
