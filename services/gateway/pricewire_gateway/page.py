"""The live page: static HTML, CSS and JS shipped in `static/`, with one card per configured asset."""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
CARDS_MARK = "<!-- cards -->"


def card(asset: str) -> str:
    """The markup of one asset's card; app.js fills the fields by class."""
    code = html.escape(asset, quote=True)
    return f"""<article class="card" data-asset="{code}" id="card-{code}">
  <header><h2 class="symbol">{code}</h2><span class="status" data-status="none">no data</span></header>
  <p class="price">&ndash;</p>
  <p class="change" data-direction="flat">&ndash;</p>
  <dl>
    <dt>confidence</dt><dd class="confidence">&ndash;</dd>
    <dt>sources used</dt><dd class="sources">&ndash;</dd>
    <dt>updated</dt><dd><time class="updated">&ndash;</time></dd>
  </dl>
</article>"""


def render_index(assets: Iterable[str]) -> bytes:
    """index.html with the cards in place, rendered once at start."""
    template = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    return template.replace(CARDS_MARK, "\n".join(card(asset) for asset in assets)).encode()
