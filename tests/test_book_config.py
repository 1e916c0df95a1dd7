"""The book's configuration and the files that follow it: the install cell of every chapter,
the launch buttons' settings and Binder's environment."""
import json
import shutil
from pathlib import Path

import yaml

from capsutil import book

ROOT = Path(__file__).resolve().parents[1]


def test_every_chapter_starts_with_the_install_cell_of_the_configured_repository():
    source = book.install_source(*book.repository())
    stale = [n.name for n in book.chapters() if book.out_of_step(n, source)]
    assert not stale, f"run `python -m capsutil.book sync`: {stale}"
    assert all(len(line) <= 80 for line in source.splitlines())
    assert "torch" not in source                                  # hosted kernels keep theirs


def test_sync_rewrites_the_install_cell_for_a_fork(tmp_path):
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "notebooks").mkdir()
    first = book.chapters()[0]
    shutil.copy(first, tmp_path / "notebooks" / first.name)
    config = yaml.safe_load((tmp_path / "_config.yml").read_text())
    config["repository"]["url"] = "https://github.com/someone/fork"
    (tmp_path / "_config.yml").write_text(yaml.safe_dump(config))
    assert book.sync(tmp_path) == [tmp_path / "notebooks" / first.name]
    assert book.sync(tmp_path) == []                                # idempotent
    cells = json.loads((tmp_path / "notebooks" / first.name).read_text())["cells"]
    installs = [c for c in cells if book.INSTALL_TAG in c["metadata"].get("tags", [])]
    assert len(installs) == 1 and 'BOOK = "https://github.com/someone/fork"' in "".join(
        installs[0]["source"])


def test_launch_urls_have_no_dot_segment_and_binder_starts_in_quick_mode_on_cpu_torch():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["repository"].get("path_to_book", "") in ("", None)
    assert "CAPSUTIL_QUICK=1" in (ROOT / "binder" / "start").read_text()
    requirements = (ROOT / "binder" / "requirements.txt").read_text()
    assert "download.pytorch.org/whl/cpu" in requirements and "jupyterlab" in requirements
