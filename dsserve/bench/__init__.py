"""Benchmarks: the timing core of the in-process benchmarks, and the streaming load client against a server."""
