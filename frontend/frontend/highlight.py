"""Syntax highlighting of a version's files for the viewer: Pygments, classes only (the CSP allows no inline style)."""

from __future__ import annotations

from markupsafe import Markup, escape
from pygments import highlight as pygmentize
from pygments.formatters import HtmlFormatter
from pygments.lexers import TextLexer, get_lexer_for_filename
from pygments.util import ClassNotFound

MAX_HIGHLIGHT_CHARS = 512 << 10  # larger files are shown plain: highlighting them would make the page slow
CSS_CLASS = "hl"


def formatter() -> HtmlFormatter:  # type: ignore[type-arg]
    return HtmlFormatter(cssclass=CSS_CLASS, linenos="table", lineanchors="L", anchorlinenos=True, wrapcode=True)


def highlight(path: str, text: str) -> Markup:
    """The text as highlighted HTML with line numbers; plain (escaped) when too large or of an unknown kind."""
    if len(text) > MAX_HIGHLIGHT_CHARS:
        return Markup(f'<div class="{CSS_CLASS}"><pre><code>{escape(text)}</code></pre></div>')
    try:
        lexer = get_lexer_for_filename(path, stripnl=False, ensurenl=False)
    except ClassNotFound:
        lexer = TextLexer(stripnl=False, ensurenl=False)
    return Markup(pygmentize(text, lexer, formatter()))


def stylesheet(style: str = "github-dark") -> str:
    """The CSS of the highlighting classes (written once into static/highlight.css)."""
    return str(HtmlFormatter(style=style, cssclass=CSS_CLASS).get_style_defs(f".{CSS_CLASS}"))
