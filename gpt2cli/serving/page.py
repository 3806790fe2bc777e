"""The page `gpt2 serve` shows at `/`: one HTML file in the package (styles and script inside it) that talks to the
server's own OpenAI routes; a chat view for checkpoints with a chat template, a completion playground for any."""

from __future__ import annotations

import importlib.resources
from functools import cache

PAGE_FILE = "page.html"
# What the page may reach: this server and nothing else (no CDN, no fonts, no analytics), even if edited.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'",
    "Cache-Control": "no-cache",
}


@cache
def page_html() -> str:
    return importlib.resources.files("gpt2cli.serving").joinpath(PAGE_FILE).read_text(encoding="utf-8")
