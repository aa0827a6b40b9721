"""Compiled kernels, each next to its plain-torch twin (the fallback and the test oracle)."""
