"""Dispatch ``python -m capsutil.bench NAME [options]`` to ``capsutil.bench.NAME.main``."""
import importlib
import pkgutil
import sys

import capsutil.bench as package


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def main(argv: list[str]) -> None:
    names = available()
    if not argv or argv[0] not in names:
        sys.exit(f"usage: python -m capsutil.bench {{{','.join(names)}}} [options]")
    importlib.import_module(f"capsutil.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
