"""Collection tooling: the demo, sample-data preparation (and later packaging and the bundle index)."""
