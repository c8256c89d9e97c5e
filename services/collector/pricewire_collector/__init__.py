"""The collector: venue feeds in, normalized ticks out on `md.tick.<source>.<BASE>-<QUOTE>`."""

from pricewire_collector.feed import Feed, build_feed
from pricewire_collector.publisher import Publisher, PublisherStats
from pricewire_collector.service import run
from pricewire_collector.sim import SimFeed

__all__ = ["Feed", "Publisher", "PublisherStats", "SimFeed", "build_feed", "run"]
