"""What the collector reads ticks from, and which feed the settings select."""

from __future__ import annotations

from typing import Protocol

from pricewire_collector.sim import SimFeed
from pricewire_common.config import Settings
from pricewire_common.errors import ConfigError
from pricewire_common.events import Tick

__all__ = ["Feed", "build_feed"]


class Feed(Protocol):
    """A source of ticks that the service paces: one call, at most one tick."""

    @property
    def name(self) -> str: ...

    def next_tick(self, now_ns: int) -> Tick | None:
        """The next tick at `now_ns`, or None when this turn has nothing to say."""
        ...


def build_feed(settings: Settings, *, run_id: str) -> Feed:
    """The feed `settings.feed` names; `run_id` makes tick ids unique to this run of the collector."""
    if settings.feed == "sim":
        sim = settings.sim
        return SimFeed(
            settings.assets,
            venues=sim.venues,
            seed=sim.seed,
            outlier_probability=sim.outlier_probability,
            quiet_rate=sim.quiet_rate,
            run_id=run_id,
        )
    raise ConfigError("PRICEWIRE_FEED", f"the collector has no feed named {settings.feed!r}")
