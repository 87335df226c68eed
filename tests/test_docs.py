"""docs/ resolves inside the repository: every relative link of a page names an existing file (and an
existing heading, for a #fragment), every docs/<page>.md reference in the code base and the README names an
existing page and heading, the index lists every page, and no page cites a document outside the repository."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
# Where a citation of a page may appear (this file names broken ones on purpose).
SOURCES = [p for d in ("covkernels", "python_ref", "tests", "bench", "examples")
           for p in sorted((ROOT / d).rglob("*"))
           if p.suffix in (".py", ".md", ".sh") and p != Path(__file__).resolve()] + [ROOT / "README.md"]

LINK = re.compile(r"\[[^\[\]]*\]\(([^()\s]+)\)")
REFERENCE = re.compile(r"\bdocs/[\w.-]+\.md(?:#[\w-]+)?")
FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`[^`]*`")


def prose(path):
    """The lines of a Markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def slug(heading):
    """GitHub's anchor of a heading: its text lower-cased, without punctuation, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path):
    """The anchors of a Markdown file's headings (a repeated one gets -1, -2, ... as on GitHub)."""
    seen, out = {}, set()
    for line in prose(path):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            out.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return out


def broken(target, base, here=None):
    """Why the link `target` (relative to the directory `base`; a bare #fragment refers to the file `here`)
    does not resolve in the repository; None if it does."""
    path, _, fragment = target.partition("#")
    dest = (base / path).resolve() if path else here
    if dest is None or not dest.is_relative_to(ROOT) or not dest.exists():
        return f"{target}: no such file in the repository"
    if fragment:
        if dest.suffix != ".md":
            return f"{target}: a #fragment on a file that is not Markdown"
        if fragment not in anchors(dest):
            return f"{target}: {dest.name} has no heading with anchor #{fragment}"
    return None


def links(page):
    """The relative link targets of a page (web and mail links left out); a link's text may span lines."""
    text = CODE_SPAN.sub("", "\n".join(prose(page)))
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_docs_have_an_index_listing_every_page():
    assert (DOCS / "README.md").exists()
    listed = {t.partition("#")[0] for t in links(DOCS / "README.md")}
    missing = [p.name for p in PAGES if p.name != "README.md" and p.name not in listed]
    assert not missing, f"docs/README.md does not link {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    targets = links(page)
    assert targets, f"{page.name} links nothing"
    problems = [p for p in (broken(t, page.parent, here=page) for t in targets) if p]
    assert not problems, f"{page.name}: " + "; ".join(problems)


def test_references_in_the_code_base_resolve():
    """Every docs/<page>.md[#anchor] written in the package, the reference, the tests, the benchmarks, the
    examples and the README names an existing page and heading."""
    refs = [(src, ref) for src in SOURCES for ref in REFERENCE.findall(src.read_text(encoding="utf-8"))]
    assert any(src.name == "README.md" for src, _ in refs), "the README does not point at docs/"
    problems = [f"{src.relative_to(ROOT)}: {p}" for src, ref in refs if (p := broken(ref, ROOT))]
    assert not problems, "; ".join(problems)


def test_nothing_cites_outside_the_repository():
    """The pages replace an external specification: neither they nor the code base cite it or an issue
    tracker's numbers."""
    for path in PAGES + SOURCES:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\bSPEC\b|\b[Ii]ssues? #?\d+", text), f"{path.name} cites outside the repository"


@pytest.mark.parametrize("heading, anchor", [
    ("The base-2 form in the kernels", "the-base-2-form-in-the-kernels"),
    ("Keeping lse2 rather than lse", "keeping-lse2-rather-than-lse"),
    ("`lse2` = (m, L)", "lse2--m-l"),
    ("[Safe](x.md) mode", "safe-mode"),
])
def test_slug_is_githubs(heading, anchor):
    assert slug(heading) == anchor


def test_broken_references_are_caught():
    """The checks fail where they should: a missing page, a missing heading, a path out of the repository."""
    assert broken("docs/README.md", ROOT) is None
    assert broken("docs/README.md#notation", ROOT) is None
    assert "no such file" in broken("docs/no_such_page.md", ROOT)
    assert "no heading" in broken("docs/README.md#no-such-heading", ROOT)
    assert "no such file" in broken("../../etc/passwd", DOCS)
