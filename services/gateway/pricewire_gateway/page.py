"""The live page: static HTML, CSS and JS shipped in `static/`, with one card per configured asset.

The cards and the asset choices are rendered once at start (the assets are configuration); every value on
them is filled by the scripts from the API and the WebSocket, as text, never as markup.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"
CARDS_MARK = "<!-- cards -->"
OPTIONS_MARK = "<!-- asset options -->"


def card(asset: str) -> str:
    """The markup of one asset's card; app.js fills the fields by class, dashboard.js draws its candles."""
    code = html.escape(asset, quote=True)
    return f"""<article class="card" data-asset="{code}" id="card-{code}">
  <header>
    <h2 class="symbol">{code}</h2>
    <span class="anomaly" hidden title="unusual move against the recent consensus">anomaly</span>
    <span class="status" data-status="none">no data</span>
  </header>
  <p class="price">&ndash;</p>
  <p class="change" data-direction="flat">&ndash;</p>
  <canvas class="candles" data-candles="0" role="img" aria-label="{code} 1-minute candles: none yet"></canvas>
  <dl>
    <dt>confidence</dt><dd class="confidence">&ndash;</dd>
    <dt>band</dt><dd class="band">&ndash;</dd>
    <dt>sources admitted</dt><dd class="sources">&ndash;</dd>
    <dt>updated</dt><dd><time class="updated">&ndash;</time></dd>
  </dl>
  <button type="button" class="select" aria-pressed="false" aria-controls="detail">Chart and sources</button>
</article>"""


def option(asset: str) -> str:
    """One asset as a choice in the page's forms (alerts, portfolio)."""
    code = html.escape(asset, quote=True)
    return f'<option value="{code}">{code}</option>'


def render_index(assets: Iterable[str]) -> bytes:
    """index.html with the cards and asset choices in place, rendered once at start."""
    codes = list(assets)
    template = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    page = template.replace(CARDS_MARK, "\n".join(card(asset) for asset in codes))
    return page.replace(OPTIONS_MARK, "".join(option(asset) for asset in codes)).encode()
