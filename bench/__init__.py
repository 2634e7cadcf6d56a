"""Benchmarks: scripts whose output goes into BENCHMARKS.md with the command that produced it."""
