"""Pictures of a run: PNG plots of its metrics log, and a self-contained HTML report."""
