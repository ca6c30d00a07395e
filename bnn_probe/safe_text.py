"""Text from a run folder (run names, tags, config values, layer names) made safe for a terminal and for Markdown.

Run folders are untrusted input (docs/trust.md). A layer name can hold terminal escape sequences, a tag can hold
``<script>`` or a ``[link](javascript:...)``. Everything printed by the command line goes through
:func:`terminal_safe`; everything the Markdown report shows goes through :func:`md_text` (or :func:`md_code` /
:func:`md_fence`; link targets in either report through :func:`safe_href`), so that the report renders the
characters, never markup.

Example:
    >>> terminal_safe("fc1\\x1b[2J")
    'fc1?[2J'
    >>> md_text("<img src=x onerror=alert(1)> [x](javascript:alert(1))")
    '&lt;img src=x onerror=alert\\\\(1\\\\)&gt; \\\\[x\\\\]\\\\(javascript:alert\\\\(1\\\\)\\\\)'
"""

from __future__ import annotations

import re
from urllib.parse import quote

__all__ = ["terminal_safe", "md_text", "md_code", "md_fence", "safe_href"]

# C0 controls except tab and newline, DEL, C1 controls, and the bidirectional overrides that reorder what is shown.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_ONE_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# Markdown punctuation that can start markup (CommonMark's escapable ASCII punctuation, minus harmless ones).
_MD_PUNCT = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def terminal_safe(text: object, one_line: bool = False) -> str:
    """``text`` with terminal control characters (escape sequences, carriage returns, bells, C1 controls,
    bidirectional overrides) replaced by ``?``; with ``one_line`` newlines and tabs too."""
    return (_CONTROL_ONE_LINE if one_line else _CONTROL).sub("?", str(text))


def md_text(text: object) -> str:
    """``text`` as literal Markdown text: HTML characters as entities, Markdown punctuation backslash-escaped,
    newlines as spaces, control characters removed. Inline HTML, links, images, emphasis and table cells cannot
    start inside it."""
    s = terminal_safe(text, one_line=True)
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_PUNCT.sub(r"\\\1", s)


def md_code(text: object) -> str:
    """``text`` as a Markdown code span, delimited by more backticks than it contains (a backtick in a name cannot
    close the span early)."""
    s = terminal_safe(text, one_line=True)
    ticks = "`" * (max((len(m) for m in re.findall(r"`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{ticks}{pad}{s}{pad}{ticks}"


def md_fence(text: str, lang: str = "") -> str:
    """A fenced code block holding ``text`` verbatim, its fence longer than any backtick run inside (a config value
    holding a fence cannot end the block early)."""
    s = terminal_safe(text)
    fence = "`" * max(3, max((len(m) for m in re.findall(r"`+", s)), default=0) + 1)
    return f"{fence}{re.sub(r'[^A-Za-z0-9_+-]', '', lang)}\n{s}\n{fence}"


def safe_href(href: str) -> str:
    """A link target for report.md or an HTML ``href``: ``http(s)://`` URLs, relative paths and ``#anchors``,
    percent-encoded (no quote, space, ``)`` or ``<`` can end it). Any other scheme (``javascript:``, ``data:``)
    becomes a harmless relative path, its colon encoded.

    >>> safe_href("javascript:alert(1)"), safe_href("#runs"), safe_href("https://arxiv.org/abs/1906.02107")
    ('javascript%3Aalert%281%29', '#runs', 'https://arxiv.org/abs/1906.02107')
    """
    s = terminal_safe(href, one_line=True)
    for scheme in ("https://", "http://"):
        if s.lower().startswith(scheme):
            return scheme + quote(s[len(scheme):], safe="/._-~#?=&%+")
    return quote(s, safe="/._-~#%")
