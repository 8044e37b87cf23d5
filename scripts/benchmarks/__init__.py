"""One module per benchmark: `measure(args)` returns the figures, `report(result)` formats them.

Run them through scripts/bench.py.
"""
