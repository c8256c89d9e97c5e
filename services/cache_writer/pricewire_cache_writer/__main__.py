"""`python -m pricewire_cache_writer`: run the cache writer until SIGTERM."""

from __future__ import annotations

from pricewire_cache_writer.service import run
from pricewire_common.runner import serve


def main() -> None:
    serve(run, service="cache_writer")


if __name__ == "__main__":
    main()
