"""Benchmarks: `isopool bench` (suite.py) and the measurements behind the README's figures."""

# what `isopool bench` can run (suite.py builds each)
MECHANISMS = ["inproc", "ceiling", "isopool", "isopool_async", "isopool_threads2", "ppe", "mp_pool", "loky", "pebble"]
