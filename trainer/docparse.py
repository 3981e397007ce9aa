"""Documents → sections under their own headings (issue 28), each parsed by a maintained
library: Markdown by markdown-it-py (CommonMark), HTML by Beautiful Soup (Python's html.parser
underneath), PDF by pypdf (one section per page: PDFs rarely carry their headings as structure);
plain text is one section. A section's path starts at the document's title: its single leading
`# h1` (or `<h1>`) when it has one, else its own title (HTML's <title>, PDF metadata) or the
file's name, so "Laptops" under a handbook reads "Onboarding › Laptops"."""
from __future__ import annotations

import io
import re
from dataclasses import dataclass

from bs4 import BeautifulSoup, NavigableString, Tag
from markdown_it import MarkdownIt
from pypdf import PdfReader
from pypdf.errors import PdfReadError

from trainer.docsource import DocumentError, Source

HEADINGS = ("h1", "h2", "h3", "h4", "h5", "h6")
BLOCKS = {"p", "div", "li", "br", "tr", "pre", "blockquote", "dd", "dt", "section", "article", "table",
          "ul", "ol", "hr", "td", "th"}
DROPPED = ["script", "style", "noscript", "template", "nav", "head"]
_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_BLANKS = re.compile(r"\n{3,}")
SEPARATOR = " › "

_MARKDOWN = MarkdownIt("commonmark").enable("table")


@dataclass(frozen=True)
class Heading:
    """A run of a document's text under one heading (level 0: before any heading)."""

    level: int
    title: str
    text: str


@dataclass(frozen=True)
class Parsed:
    title: str
    sections: list[tuple[str, str]]  # (title path "A › B", text), in document order


def parse(source: Source) -> Parsed:
    """The document's sections with their title paths; empty ones dropped."""
    if source.kind == "pdf":
        title, runs = parse_pdf(source)
    else:
        text = decode(source)
        title, runs = {"markdown": parse_markdown, "html": parse_html, "text": parse_text}[source.kind](text, source.name)
    sections = titled(title, runs)
    if not sections:
        raise DocumentError(f"{source.source}: no text in this document")
    return Parsed(title, sections)


def decode(source: Source) -> str:
    try:
        return source.data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"{source.source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def titled(title: str, runs: list[Heading]) -> list[tuple[str, str]]:
    """Each run's title path: the headings above it, under the document's title."""
    stack: list[tuple[int, str]] = []
    out = []
    for run in runs:
        if run.level:
            while stack and stack[-1][0] >= run.level:
                stack.pop()
            stack.append((run.level, run.title))
        text = tidy(run.text)
        if text:
            out.append((SEPARATOR.join([title, *(t for _, t in stack)]), text))
    return out


def root_heading(runs: list[Heading], fallback: str) -> tuple[str, list[Heading]]:
    """The document's title: its first heading when that is the only h1, which then stands for
    the whole document (its text is the title's own); else `fallback`."""
    heads = [r for r in runs if r.level]
    if heads and heads[0].level == 1 and sum(r.level == 1 for r in heads) == 1:
        return heads[0].title, [Heading(0, "", r.text) if r is heads[0] else r for r in runs]
    return fallback, runs


def parse_markdown(text: str, name: str) -> tuple[str, list[Heading]]:
    """Top-level blocks between headings, as their Markdown source lines (lists stay lists)."""
    lines = text.splitlines()
    tokens = _MARKDOWN.parse(text)
    runs, level, title, body = [], 0, "", []
    for i, token in enumerate(tokens):
        if token.level != 0 or token.map is None or token.type.endswith("_close"):
            continue
        if token.type == "heading_open":
            runs.append(Heading(level, title, "\n".join(body)))
            level, title, body = int(token.tag[1]), tokens[i + 1].content.strip(), []
        else:
            body.append("\n".join(lines[token.map[0]:token.map[1]]))
    runs.append(Heading(level, title, "\n".join(body)))
    return root_heading(runs, name)


def parse_html(text: str, name: str) -> tuple[str, list[Heading]]:
    """Text between headings, block elements on lines of their own; scripts, styles and
    navigation left out."""
    soup = BeautifulSoup(text, "html.parser")
    page_title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup.find_all(DROPPED):
        tag.decompose()
    runs, level, title, body = [], 0, "", []
    for node in soup.descendants:
        if isinstance(node, Tag) and node.name in HEADINGS:
            runs.append(Heading(level, title, "".join(body)))
            level, title, body = int(node.name[1]), node.get_text(" ", strip=True), []
        elif isinstance(node, Tag) and node.name in BLOCKS:
            body.append("\n")
        elif type(node) is NavigableString and node.find_parent(HEADINGS) is None:
            body.append(str(node))
    runs.append(Heading(level, title, "".join(body)))
    return root_heading(runs, page_title or name)


def parse_text(text: str, name: str) -> tuple[str, list[Heading]]:
    return name, [Heading(0, "", text)]


def parse_pdf(source: Source) -> tuple[str, list[Heading]]:
    """One section per page with text, titled by the PDF's metadata title (or the file's name)."""
    try:
        reader = PdfReader(io.BytesIO(source.data))
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or source.name
    except (PdfReadError, ValueError, KeyError) as exc:
        raise DocumentError(f"{source.source}: not a readable PDF ({exc})") from exc
    if not any(p.strip() for p in pages):
        raise DocumentError(f"{source.source}: the PDF has no text layer (a scan?); nothing to import")
    return str(title).strip(), [Heading(1, f"page {n}", text) for n, text in enumerate(pages, 1)]


def tidy(text: str) -> str:
    """Spaces collapsed, lines trimmed, at most one blank line in a row."""
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.replace("\r\n", "\n").split("\n"))
    return _BLANKS.sub("\n\n", text).strip()
