"""The `pricewire` command line and the embedded servers it can start."""
