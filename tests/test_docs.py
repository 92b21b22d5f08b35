"""The docs a newcomer reads: true to the tree, in the model zoo's order, short, with links that lead somewhere."""

from __future__ import annotations

import posixpath
import re
import zipfile

import pytest
from helpers import BTCV, REPO

from bundles.package import SHARED_DOCS, package_bundle

BUNDLES = ["swin_unetr_btcv", "swin_unetr_msd", "swin_unetr_ssl"]
#: the sections of every bundle README, in the model zoo's template order (others may sit between them)
TEMPLATE_SECTIONS = [
    "Overview",
    "Data",
    "Training",
    "Evaluation",
    "Inference",
    "Performance",
    "Commands",
    "References",
    "License",
]
MAX_README_LINES = 250
DOCS = sorted(
    {
        *REPO.glob("*.md"),
        *REPO.glob("docs/*.md"),
        *REPO.glob("bench/*.md"),
        *REPO.glob("swin_unetr_*/docs/*.md"),
    }
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose_lines_keep_code(markdown: str) -> list[str]:
    """The lines outside fenced code blocks, as written."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def prose_lines(markdown: str) -> list[str]:
    """The lines outside fenced code blocks, inline code removed."""
    return [re.sub(r"`[^`]*`", "", line) for line in prose_lines_keep_code(markdown)]


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces as '-', repeats numbered."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines_keep_code(markdown):
        m = re.match(r"#{1,6} +(.+?) *$", line)
        if m:
            base = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(markdown: str, where: str, read) -> list[str]:
    """Relative links of ``markdown`` (a file at ``where``) whose file or heading ``read(path)`` cannot find.

    ``read`` returns a file's text, or None where there is no such file.
    """
    broken = []
    for line in prose_lines(markdown):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(where), path)) if path else where
            text = read(resolved)
            if text is None:
                broken.append(f"{target}: no file {resolved}")
            elif anchor and resolved.endswith(".md") and anchor not in anchors(text):
                broken.append(f"{target}: no heading #{anchor} in {resolved}")
    return broken


def read_repo_file(rel: str) -> str | None:
    path = REPO / rel
    if path.is_dir():
        return ""
    return path.read_text(encoding="utf-8") if path.is_file() else None


def section(markdown: str, title: str) -> str:
    """The text of the ``## title`` section, up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    assert match, f"no '## {title}' section"
    return match.group(1)


def test_layout_names_every_package_under_custom():
    layout = section((REPO / "README.md").read_text(encoding="utf-8"), "Layout")
    packages = sorted(p.parent.relative_to(REPO / "custom") for p in (REPO / "custom").rglob("__init__.py"))
    unnamed = [
        f"custom/{p.as_posix()}/"
        for p in packages
        if p.parts and not re.search(rf"(?<![\w-]){re.escape(p.name)}/", layout)
    ]
    assert not unnamed, f"README.md's Layout does not name these packages: {unnamed}"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_readme_follows_the_zoo_template_and_stays_short(bundle):
    text = (REPO / bundle / "docs" / "README.md").read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= MAX_README_LINES, f"{bundle}/docs/README.md: {lines} lines, more than {MAX_README_LINES}"
    headings = [line[3:].strip() for line in prose_lines_keep_code(text) if line.startswith("## ")]
    missing = [s for s in TEMPLATE_SECTIONS if s not in headings]
    assert not missing, f"{bundle}/docs/README.md lacks sections {missing}; it has {headings}"
    order = [headings.index(s) for s in TEMPLATE_SECTIONS]
    assert order == sorted(order), f"{bundle}/docs/README.md: sections {headings}, not in the order {TEMPLATE_SECTIONS}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_lead_to_a_file_and_heading(doc):
    rel = doc.relative_to(REPO).as_posix()
    assert not broken_links(doc.read_text(encoding="utf-8"), rel, read_repo_file)


def test_link_checker_finds_a_missing_file_and_a_missing_heading():
    text = "## Here\n[a](#here) [b](#gone) [c](nofile.md) [d](README.md#layout) `[e](x.md)`\n```\n[f](y.md)\n```\n"
    assert broken_links(text, "t.md", lambda p: text if p == "t.md" else read_repo_file(p)) == [
        "#gone: no heading #gone in t.md",
        "nofile.md: no file nofile.md",
    ]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_bundle_readme_links_the_operations_guide(bundle):
    text = (REPO / bundle / "docs" / "README.md").read_text(encoding="utf-8")
    assert "](../../docs/operations.md" in text


def test_packaged_bundle_carries_the_operations_guide_and_its_links_work(tmp_path):
    """The archive holds the guide beside the README, whose links to it resolve inside the unpacked bundle."""
    archive = package_bundle(BTCV, tmp_path)
    with zipfile.ZipFile(archive) as zf:
        files = {n: zf.read(n).decode("utf-8") for n in zf.namelist() if n.endswith(".md")}
    for repo_path, rel in SHARED_DOCS.items():
        assert files[f"swin_unetr_btcv/{rel}"] == (REPO / repo_path).read_text(encoding="utf-8")
    readme = files["swin_unetr_btcv/docs/README.md"]
    assert "](../../docs/operations.md" not in readme and "](operations.md#" in readme
    inside = [link for link in LINK.findall(readme) if "operations.md" in link]
    assert inside and not broken_links(
        "\n".join(f"[x]({link})" for link in inside), "swin_unetr_btcv/docs/README.md", files.get
    )
    for rel in SHARED_DOCS.values():  # a shared document links nothing the archive lacks
        assert not broken_links(files[f"swin_unetr_btcv/{rel}"], f"swin_unetr_btcv/{rel}", files.get)
