"""`python -m pricewire_cli` is the `pricewire` command."""

from pricewire_cli.app import main

main()
