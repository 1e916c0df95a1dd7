"""Test configuration for tests/ and notebooks/: quick mode and no network, for the tests and every
notebook kernel. nbval starts each kernel from this process, so the kernels inherit these variables.
"""
import os

os.environ["CAPSUTIL_QUICK"] = "1"
os.environ["CAPSUTIL_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
