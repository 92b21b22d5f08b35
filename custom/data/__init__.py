"""Data and transforms: finding inputs, checking them before a run, caching, loading per case."""
