"""Benchmarks of the AIDSAFE service: scripts anyone can run; figures go to RESULTS.md."""
