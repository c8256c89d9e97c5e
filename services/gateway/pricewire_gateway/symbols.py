"""What a client may call an asset: `btc`, `BTC`, `btcusdt`, `BTC-USDT`, `btc/usd` all mean BTC."""

from __future__ import annotations

from collections.abc import Iterable

from pricewire_gateway.errors import RequestError

_SEPARATORS = ("-", "/", "_")
MAX_SYMBOLS = 64
"""Most symbols one subscribe/unsubscribe frame may name."""


class SymbolResolver:
    """Maps client symbols to configured assets; pairs count only when quoted in a USD quote."""

    def __init__(self, assets: Iterable[str], usd_quotes: Iterable[str]) -> None:
        self.assets = tuple(assets)
        self._assets = frozenset(self.assets)
        self._quotes = frozenset(usd_quotes)
        # Longest first, so BTCUSDT is BTC/USDT and not BTCUSD/T.
        self._quotes_by_length = sorted(self._quotes, key=len, reverse=True)

    def asset(self, symbol: str) -> str | None:
        """The configured asset `symbol` names, or None."""
        code = symbol.strip().upper()
        if code in self._assets:
            return code
        for separator in _SEPARATORS:
            if separator in code:
                base, _, quote = code.partition(separator)
                return base if base in self._assets and quote in self._quotes else None
        for quote in self._quotes_by_length:
            if code.endswith(quote) and code[: -len(quote)] in self._assets:
                return code[: -len(quote)]
        return None

    def require(self, symbol: str) -> str:
        """The asset `symbol` names, or RequestError `unknown_asset`."""
        asset = self.asset(symbol)
        if asset is None:
            raise RequestError(
                "unknown_asset",
                f"{symbol!r} is not a configured asset ({', '.join(self.assets)}) or its USD pair",
            )
        return asset

    def require_all(self, symbol: str | None, symbols: list[str] | None) -> list[str]:
        """The distinct assets a subscribe-like frame names, in its order; all of them or an error."""
        names = ([symbol] if symbol is not None else []) + (symbols or [])
        if not names:
            raise RequestError("bad_message", "give `symbol` or a non-empty `symbols` list")
        if len(names) > MAX_SYMBOLS:
            raise RequestError("bad_message", f"at most {MAX_SYMBOLS} symbols per frame")
        return list(dict.fromkeys(self.require(name) for name in names))
