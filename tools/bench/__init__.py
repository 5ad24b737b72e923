"""Benchmarks: `system` drives the whole platform end to end (`alliance bench`); the others
measure one service each (`python -m tools.bench.<service>`). Figures, not assertions."""
