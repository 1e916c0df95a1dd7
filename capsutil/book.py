"""Keep the chapters in step with the book's configuration: ``python -m capsutil.book sync``.

Every chapter starts with one cell that installs ``capsutil`` from the book's repository when
it is missing, so that a notebook opened on Colab (or any hosted Jupyter) runs as it is. The
repository's address is written in one place, ``repository.url`` in ``_config.yml``; ``sync``
writes that cell into every notebook of ``_toc.yml``, and ``check`` (used by the tests) says
which notebooks are out of step. The cell never pins torch: hosted kernels bring their own.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

INSTALL_TAG = "install-capsutil"
ROOT = Path(__file__).resolve().parent.parent


def repository(root: Path = ROOT) -> tuple[str, str]:
    """(url, branch) of ``repository`` in ``root/_config.yml``."""
    config = yaml.safe_load((root / "_config.yml").read_text())
    repo = config.get("repository") or {}
    if not repo.get("url"):
        raise ValueError(f"{root / '_config.yml'} names no repository.url")
    return repo["url"].rstrip("/"), repo.get("branch", "main")


def install_source(url: str, branch: str) -> str:
    """The source of the install cell for the repository at ``url`` (each line <= 80 chars)."""
    return "\n".join([
        "# On Colab or another hosted Jupyter: install the book's package first.",
        "import importlib.util, subprocess, sys",
        "",
        f'BOOK = "{url}"',
        'if importlib.util.find_spec("capsutil") is None:',
        '    subprocess.run([sys.executable, "-m", "pip", "install", "-q",',
        f'                    f"capsutil @ git+{{BOOK}}@{branch}"], check=True)',
    ])


def chapters(root: Path = ROOT) -> list[Path]:
    """The notebooks listed in ``root/_toc.yml``, in reading order."""
    toc = yaml.safe_load((root / "_toc.yml").read_text())
    files = [chapter["file"] for part in toc.get("parts", [])
             for chapter in part.get("chapters", [])]
    return [root / f"{name}.ipynb" for name in files if (root / f"{name}.ipynb").is_file()]


def _install_cell(source: str, cell_id: str) -> dict:
    lines = source.split("\n")
    return {"cell_type": "code", "execution_count": None, "id": cell_id,
            "metadata": {"tags": [INSTALL_TAG, "hide-cell"]}, "outputs": [],
            "source": [line + "\n" for line in lines[:-1]] + lines[-1:]}


def _first_code_cell(cells: list[dict]) -> dict | None:
    return next((cell for cell in cells if cell["cell_type"] == "code"), None)


def out_of_step(notebook: Path, source: str) -> bool:
    """Whether ``notebook``'s first code cell is not the install cell with ``source``."""
    cell = _first_code_cell(json.loads(notebook.read_text())["cells"])
    return (cell is None or INSTALL_TAG not in cell["metadata"].get("tags", [])
            or "".join(cell["source"]) != source)


def sync(root: Path = ROOT) -> list[Path]:
    """Write the install cell at the top of every chapter; returns the notebooks changed."""
    source = install_source(*repository(root))
    changed = []
    for notebook in chapters(root):
        if not out_of_step(notebook, source):
            continue
        book = json.loads(notebook.read_text())
        cells = [cell for cell in book["cells"]
                 if INSTALL_TAG not in cell.get("metadata", {}).get("tags", [])]
        first_code = next(i for i, cell in enumerate(cells) if cell["cell_type"] == "code")
        cells.insert(first_code, _install_cell(source, INSTALL_TAG))
        book["cells"] = cells
        notebook.write_text(json.dumps(book, indent=1, ensure_ascii=False) + "\n")
        changed.append(notebook)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m capsutil.book", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("sync", "check"))
    args = parser.parse_args(argv)
    if args.command == "sync":
        for notebook in sync():
            print(f"updated {notebook.relative_to(ROOT)}")
        return 0
    source = install_source(*repository())
    stale = [n for n in chapters() if out_of_step(n, source)]
    for notebook in stale:
        print(f"{notebook.relative_to(ROOT)}: install cell out of step with _config.yml")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
