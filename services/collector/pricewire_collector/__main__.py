"""`python -m pricewire_collector`: run the collector until SIGTERM/SIGINT."""

from pricewire_collector.service import run
from pricewire_common.runner import serve


def main() -> None:
    serve(run, service="collector")


if __name__ == "__main__":
    main()
