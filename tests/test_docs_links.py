"""The README stays a page, and no relative link in README.md or docs/*.md is broken.

Why: the README was split into one file per topic under docs/; a renamed
heading or a moved file would otherwise leave links that point nowhere. Every
relative link (inline, image or reference-style, outside code) must name a
file or directory that exists, and a `#fragment` into a Markdown file must
name one of its headings (GitHub's anchor rules). Also checked: the README's
set-up and test commands are the ones `.ci/run` runs, and the grpcurl call the
README shows is, character for character, a recipe of docs/clients.md (which
tests/test_grpcurl_recipes.py runs against a live server).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 300

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


def prose(markdown: str) -> str:
    """The text outside fenced code blocks and inline code spans."""
    without_fences = FENCE.sub("", markdown)
    return INLINE_CODE.sub("code", without_fences)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link and emphasis markup dropped, lower
    case, punctuation other than '-' and '_' removed, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes."""
    seen: dict[str, int] = {}
    result: set[str] = set()
    for match in HEADING.finditer(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def relative_links(path: Path) -> list[str]:
    text = prose(path.read_text(encoding="utf-8"))
    targets = INLINE_LINK.findall(text) + REFERENCE_DEFINITION.findall(text)
    return [t for t in targets if not EXTERNAL.match(t)]


def broken_links(path: Path) -> list[str]:
    problems: list[str] = []
    for target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        destination = (path.parent / unquote(file_part)).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{target}: {destination} does not exist")
            continue
        if fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            problems.append(f"{target}: no heading with anchor #{fragment} in {destination.name}")
    return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_checker_sees_links_and_anchors(tmp_path: Path) -> None:
    """The checker itself: a missing file, a missing anchor and a link inside
    code (ignored) in a throwaway page."""
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading: yes\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#a-code-heading-yes) [self](#page) [gone](missing.md)\n"
        "[bad anchor](other.md#nope) `[in code](nowhere.md)`\n\n```\n[fenced](nowhere.md)\n```\n"
    )
    problems = [p.split(":")[0] for p in broken_links(page)]
    assert problems == ["missing.md", "other.md#nope"]
    assert slug("The real path: in front of an OpenAI-compatible upstream") == (
        "the-real-path-in-front-of-an-openai-compatible-upstream"
    )


def test_readme_fits_on_a_page() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines (at most {MAX_README_LINES})"


def test_readme_commands_are_the_ones_ci_runs() -> None:
    """The README's first bash block is the set-up and the test command;
    `.ci/run` runs the same two on a clean clone."""
    block = re.search(r"^```bash\n(.*?)^```$", README.read_text(encoding="utf-8"), re.S | re.M)
    assert block, "README.md has no bash block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == ["scripts/setup.sh", ".venv/bin/pytest"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert any(line.startswith("bash scripts/setup.sh") for line in ci)  # plus --llama
    assert ci[-1] == ".venv/bin/pytest"


def recipe_blocks(markdown: str) -> dict[str, str]:
    blocks = re.findall(r"^```bash\n(# recipe: ([a-z0-9-]+)\n.*?)^```$", markdown, re.S | re.M)
    return {name: body for body, name in blocks}


def test_readme_grpcurl_call_is_a_tested_recipe() -> None:
    readme = recipe_blocks(README.read_text(encoding="utf-8"))
    recipes = recipe_blocks((ROOT / "docs" / "clients.md").read_text(encoding="utf-8"))
    assert readme, "README.md shows no grpcurl recipe"
    for name, body in readme.items():
        assert recipes.get(name) == body, f"README recipe {name} differs from docs/clients.md"
