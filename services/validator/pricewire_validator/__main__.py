"""`python -m pricewire_validator`: run the validator until SIGTERM."""

from __future__ import annotations

from pricewire_common.runner import serve
from pricewire_validator.service import run


def main() -> None:
    serve(run, service="validator")


if __name__ == "__main__":
    main()
