"""Measurements of chainsaga on a real stack: `make bench` (perf.bench) and `make chaos` (perf.chaos).

Not part of the installed package: these are scripts run from a checkout."""
