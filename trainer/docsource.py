"""Where imported documents come from (issue 28): files, folders (recursively) and URLs, read
into bytes with their kind. A URL is fetched once with httpx: only http and https, a timeout, a
size limit, redirects followed by hand (at most `MAX_REDIRECTS`) so each hop is checked, and no
private, loopback, link-local or otherwise non-public address unless FLYWHEEL_DOCS_ALLOW_PRIVATE
is set: the host is resolved and every address it resolves to is checked."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

MAX_REDIRECTS = 5
SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html",
            ".txt": "text", ".text": "text", ".pdf": "pdf"}
CONTENT_TYPES = {"text/markdown": "markdown", "text/x-markdown": "markdown", "text/html": "html",
                 "application/xhtml+xml": "html", "text/plain": "text", "application/pdf": "pdf"}


class DocumentSettings(BaseSettings):
    """`flywheel docs import`'s limits, and how `flywheel docs questions --generate` asks."""

    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore")

    docs_max_bytes: int = Field(default=20_000_000, ge=1)  # one file or download
    docs_fetch_timeout_s: float = Field(default=15.0, gt=0)
    docs_allow_private: bool = False  # URLs on private, loopback or link-local addresses
    # a section longer than this is split at paragraphs: the embedder reads 128 tokens (~500
    # characters) of each, and every note goes into the prompt
    docs_section_chars: int = Field(default=800, ge=200)
    # Questions generated from sections (`flywheel docs questions --generate`, trainer/docquestions.py)
    gateway_url: str | None = None  # the gateway they are asked through
    gateway_api_key: str | None = None
    docs_questions: int = Field(default=3, ge=1, le=10)  # asked for per section, at most
    # the untouched instruct model: an adapter learned to answer the team's questions, not to label
    docs_questions_model: str = "base"
    # share of an answer's content words that must appear in its section (the rest is the model's own)
    docs_questions_min_support: float = Field(default=0.8, gt=0.0, le=1.0)


class DocumentError(ValueError):
    """A document that cannot be imported; the message says which and why."""


@dataclass(frozen=True)
class Source:
    """One document's bytes: `source` is its absolute path or its URL (what re-imports match on)."""

    source: str
    name: str  # a title when the document has none of its own: the file's or the URL's stem
    kind: str
    data: bytes


def is_url(text: str) -> bool:
    return "://" in text


def collect(inputs: list[str], settings: DocumentSettings, client: httpx.Client) -> list[Source]:
    """Every document the inputs name: files, the supported files under folders, URLs."""
    found: list[Source] = []
    for item in inputs:
        if is_url(item):
            found.append(fetch(item, settings, client))
        else:
            found.extend(read_path(Path(item), settings))
    return found


def read_path(path: Path, settings: DocumentSettings) -> list[Source]:
    """A file, or every supported file under a folder (sorted; others skipped)."""
    if not path.exists():
        raise DocumentError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DocumentError(f"{path}: no Markdown, HTML, text or PDF files in this folder")
        return [read_file(p, settings) for p in files]
    return [read_file(path, settings)]


def read_file(path: Path, settings: DocumentSettings) -> Source:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DocumentError(f"{path}: unsupported file type {path.suffix or '(none)'}; "
                            f"use {', '.join(SUFFIXES)}")
    size = path.stat().st_size
    if size > settings.docs_max_bytes:
        raise DocumentError(f"{path}: {size} bytes, over FLYWHEEL_DOCS_MAX_BYTES ({settings.docs_max_bytes})")
    if size == 0:
        raise DocumentError(f"{path}: empty file")
    return Source(str(path.resolve()), path.stem, kind, path.read_bytes())


def fetch(url: str, settings: DocumentSettings, client: httpx.Client) -> Source:
    """The document at `url`, its redirects followed and each hop's host checked."""
    current = url
    for _hop in range(MAX_REDIRECTS + 1):
        check_url(current, allow_private=settings.docs_allow_private)
        try:
            with client.stream("GET", current, timeout=settings.docs_fetch_timeout_s,
                               follow_redirects=False) as response:
                if response.is_redirect:
                    current = urljoin(current, response.headers.get("location", ""))
                    continue
                if response.status_code != 200:
                    raise DocumentError(f"{url}: HTTP {response.status_code}")
                data = read_limited(response, url, settings.docs_max_bytes)
                return Source(url, url_stem(url), kind_of_response(url, response), data)
        except httpx.HTTPError as exc:
            raise DocumentError(f"{url}: could not fetch ({type(exc).__name__}: {exc})") from exc
    raise DocumentError(f"{url}: more than {MAX_REDIRECTS} redirects")


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuse what is not http(s), and hosts that resolve to any non-public address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DocumentError(f"{url}: only http and https URLs with a host are imported")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DocumentError(f"{url}: cannot resolve {parts.hostname} ({exc})") from exc
    if allow_private:
        return
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if address.version == 6 and address.ipv4_mapped:  # ::ffff:127.0.0.1 is loopback too
            address = address.ipv4_mapped
        if not address.is_global or address.is_multicast:
            raise DocumentError(f"{url}: {parts.hostname} resolves to {address}, a private, loopback or "
                                "link-local address; set FLYWHEEL_DOCS_ALLOW_PRIVATE=1 to import from it")


def read_limited(response: httpx.Response, url: str, limit: int) -> bytes:
    """The body, refused as soon as it passes `limit` bytes (announced or not)."""
    announced = response.headers.get("content-length")
    if announced and announced.isdigit() and int(announced) > limit:
        raise DocumentError(f"{url}: {announced} bytes, over FLYWHEEL_DOCS_MAX_BYTES ({limit})")
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > limit:
            raise DocumentError(f"{url}: more than FLYWHEEL_DOCS_MAX_BYTES ({limit}) bytes")
        chunks.append(chunk)
    if not size:
        raise DocumentError(f"{url}: empty response")
    return b"".join(chunks)


def kind_of_response(url: str, response: httpx.Response) -> str:
    """The URL's file suffix when it names a supported one, else the response's content type."""
    kind = SUFFIXES.get(Path(urlsplit(url).path).suffix.lower())
    if kind:
        return kind
    content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in CONTENT_TYPES:
        raise DocumentError(f"{url}: unsupported content type {content_type or '(none)'}; "
                            "Markdown, HTML, plain text or PDF")
    return CONTENT_TYPES[content_type]


def url_stem(url: str) -> str:
    parts = urlsplit(url)
    return Path(parts.path).stem or parts.hostname or url
