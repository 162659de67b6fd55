"""A style page's cards as HTML, written here instead of by the template: a collection has 200,000 of
them, and autoescaping (a Markup object made for each of ~20 values a card) was most of a page's time.

Every value goes through `esc`, which escapes exactly as the templates' autoescaping does (markupsafe:
& < > " and '), so a card reads the same either way; only the chart (curves.chart_svg: numbers only)
goes in as it is. tests/report checks hostile names on every page.
"""

from __future__ import annotations

from typing import NamedTuple

from markupsafe import Markup


class Card(NamedTuple):
    """One pair on its style's page."""
    id: str
    content: str
    state: str
    name: str
    kind: str
    message: str
    short: str
    href: str | None
    thumb: str | None
    src: str | None
    note: str | None
    meta: str
    losses: str
    svg: Markup | None


def esc(value: object) -> str:
    """markupsafe.escape's text, without making a Markup object: most names need no change at all."""
    s = str(value)
    if "&" in s:
        s = s.replace("&", "&amp;")
    if "<" in s:
        s = s.replace("<", "&lt;")
    if ">" in s:
        s = s.replace(">", "&gt;")
    if '"' in s:
        s = s.replace('"', "&#34;")
    if "'" in s:
        s = s.replace("'", "&#39;")
    return s


_LAZY = 'loading="lazy" decoding="async"'


def _out(c: Card) -> str:
    """The card's picture, or what stands in for it."""
    if c.state == "failed":
        return f'<div class="err" title="{esc(c.message)}"><b>{esc(c.kind)}</b>{esc(c.short)}</div>'
    if c.state != "done":
        return f'<div class="ph"><span class="st st-{esc(c.state)}">{esc(c.state)}</span></div>'
    if not c.href:
        return '<div class="ph">output missing</div>'
    name = esc(c.name)
    if c.thumb:
        return f'<a href="{esc(c.href)}" title="{name}"><img src="{esc(c.thumb)}" alt="{name}" {_LAZY}></a>'
    return f'<a href="{esc(c.href)}" title="{name}"><div class="ph">no preview</div></a>'


def card_html(c: Card) -> str:
    state, content = esc(c.state), esc(c.content)
    src = f'<img src="{esc(c.src)}" alt="{content}" {_LAZY}>' if c.src else '<div class="ph">no preview</div>'
    note = f' <span class="cap">{esc(c.note)}</span>' if c.note else ""
    return (f'<div class="card st-{state}" id="{esc(c.id)}">\n<div class="out">{_out(c)}</div>\n'
            f'<div class="who">{src}<div><div class="name">{content}</div><span class="st st-{state}">{state}</span>'
            f'{note}</div></div>\n<p class="cap">{esc(c.meta)}<br>{esc(c.losses)}</p>\n'
            f'{c.svg + chr(10) if c.svg else ""}</div>\n')


def cards_html(cards: list[Card]) -> Markup:
    """The cards of a page, ready for the template: each value escaped by card_html."""
    return Markup("".join(map(card_html, cards)))
