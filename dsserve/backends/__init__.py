"""Kernel backends: picked once per process by the runner (see `dsserve.backends.base.Backend`)."""
