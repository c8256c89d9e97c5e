"""The gateway: REST, WebSocket and a live page over consensus prices."""

from pricewire_gateway.app import build_app
from pricewire_gateway.service import run

__all__ = ["build_app", "run"]
