"""Test configuration: quick mode and no network for unit tests and for every notebook kernel.

nbval starts each notebook's kernel from this process, so the kernels inherit these variables.
"""
import os

os.environ["CAPSUTIL_QUICK"] = "1"
os.environ["CAPSUTIL_OFFLINE"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")
