"""Write realistic Binance `bookTicker` frames, one per line, as the combined stream sends them.

    python bench/frames_binance_bookticker.py --n 100000 > /tmp/bookticker.ndjson

Each frame is `{"stream":"<symbol>@bookTicker","data":{"u":..,"s":..,"b":..,"B":..,"a":..,"A":..}}`
(the documented payload: update id, symbol, best bid price/qty, best ask price/qty, as strings with the
venue's 8 decimals). Prices walk randomly around a start level per asset, with a spread of one or a few
ticks; the update id grows per frame. Seeded, so two runs write the same file. With `--fresh-quotes`
every frame carries a (bid, ask) pair not seen before: the worst case for a parser that remembers pairs.
"""

from __future__ import annotations

import argparse
import random
import sys
from decimal import Decimal

# Start level and tick size per asset (USDT pairs), close to 2024 markets.
MARKETS: dict[str, tuple[Decimal, Decimal]] = {
    "BTC": (Decimal("67000.00"), Decimal("0.01")),
    "ETH": (Decimal("3500.00"), Decimal("0.01")),
    "SOL": (Decimal("150.00"), Decimal("0.01")),
    "ADA": (Decimal("0.4500"), Decimal("0.0001")),
    "DOT": (Decimal("7.000"), Decimal("0.001")),
}
EIGHT = Decimal("0.00000001")


def frames(n: int, *, assets: list[str], seed: int, fresh_quotes: bool = False) -> list[str]:
    """`n` frames, the assets taking turns at random; with `fresh_quotes` every mid is new (it only rises)."""
    rng = random.Random(seed)
    mids = {asset: MARKETS[asset][0] for asset in assets}
    update_id = 40_090_021_700
    out: list[str] = []
    for _ in range(n):
        asset = rng.choice(assets)
        tick = MARKETS[asset][1]
        step = rng.randint(1, 3) if fresh_quotes else rng.randint(-3, 3)
        mid = max(tick * 10, mids[asset] + tick * step)
        mids[asset] = mid
        bid = mid
        ask = mid + tick * rng.choice((1, 1, 1, 2, 3))
        bid_qty = Decimal(rng.randint(1, 5_000_000)) / 100_000
        ask_qty = Decimal(rng.randint(1, 5_000_000)) / 100_000
        update_id += rng.randint(1, 40)
        symbol = f"{asset}USDT"
        out.append(
            f'{{"stream":"{symbol.lower()}@bookTicker","data":{{"u":{update_id},"s":"{symbol}",'
            f'"b":"{bid.quantize(EIGHT)}","B":"{bid_qty.quantize(EIGHT)}",'
            f'"a":"{ask.quantize(EIGHT)}","A":"{ask_qty.quantize(EIGHT)}"}}}}'
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=100_000, help="how many frames")
    parser.add_argument("--assets", default=",".join(MARKETS), help=f"comma-separated, of {', '.join(MARKETS)}")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--fresh-quotes", action="store_true", help="no (bid, ask) pair ever repeats")
    args = parser.parse_args()
    assets = [a.strip().upper() for a in args.assets.split(",") if a.strip()]
    unknown = [a for a in assets if a not in MARKETS]
    if unknown or not assets or args.n < 0:
        parser.error(f"assets must be among {', '.join(MARKETS)} and --n >= 0")
    lines = frames(args.n, assets=assets, seed=args.seed, fresh_quotes=args.fresh_quotes)
    sys.stdout.writelines(f"{frame}\n" for frame in lines)


if __name__ == "__main__":
    main()
