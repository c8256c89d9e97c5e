"""Live venue connectors: one module per venue, all behind the `Source` protocol of `base`."""
