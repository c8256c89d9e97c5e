"""`python -m pricewire_gateway [--host H] [--port P]`: run the gateway until SIGTERM."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import replace

from pricewire_common.config import Settings
from pricewire_common.runner import serve
from pricewire_gateway.service import SERVICE, run


def parse_settings(argv: Sequence[str] | None = None, *, base: Settings | None = None) -> Settings:
    """Settings from the environment, with `--host`/`--port` overriding the gateway's."""
    parser = argparse.ArgumentParser(prog="python -m pricewire_gateway", description=__doc__)
    parser.add_argument("--host", help="interface to listen on (default: PRICEWIRE_GATEWAY_HOST or 0.0.0.0)")
    parser.add_argument(
        "--port", type=int, help="TCP port, 0 for any free one (default: PRICEWIRE_GATEWAY_PORT or 8000)"
    )
    args = parser.parse_args(argv)
    settings = base or Settings.from_env()
    gateway = settings.gateway
    if args.host is not None:
        gateway = replace(gateway, host=args.host)
    if args.port is not None:
        if not 0 <= args.port <= 65535:
            parser.error("--port must be between 0 and 65535")
        gateway = replace(gateway, port=args.port)
    return replace(settings, gateway=gateway)


def main() -> None:
    serve(run, service=SERVICE, settings=parse_settings())


if __name__ == "__main__":
    main()
