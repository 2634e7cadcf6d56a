"""Applications built on the library: the demo, the run report, export, encode and the memory plan.

The command line (clipx/cli.py) calls them; the library's core (config, models, losses, methods,
data, train) never imports them at module level.
"""
