"""Benchmarks that print figures (never timed tests): ``python -m capsutil.bench NAME``.

Each benchmark is a module ``capsutil.bench.<NAME>`` with a ``main(argv)`` function that prints
its figures and, on its last line, the ratio it is judged by.
"""
