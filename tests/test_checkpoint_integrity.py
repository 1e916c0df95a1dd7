"""Specifications of checkpoint integrity: checksums, the previous good checkpoint, atomic and
durable saves, and what a killed save leaves behind."""
import os
import signal
import stat
import subprocess
import sys
import textwrap

import pytest
import torch

from capsutil import checkpoints
from capsutil.checkpoints import CorruptCheckpoint, load_checkpoint, save_checkpoint


@pytest.fixture
def saved_twice(tmp_path):
    """A checkpoint saved at step 1 and then at step 2, so that step 1 is the previous one."""
    path = tmp_path / "checkpoint.pt"
    for step in (1, 2):
        save_checkpoint({"step": step, "weights": torch.full((200,), float(step))}, path)
    return path


def test_a_save_keeps_the_checkpoint_it_replaces_as_the_previous_good_one(saved_twice):
    previous = checkpoints.previous_checkpoint(saved_twice)
    assert previous.name == "checkpoint.prev.pt"
    assert load_checkpoint(saved_twice)["step"] == 2
    assert load_checkpoint(previous)["step"] == 1


def test_every_single_bit_flip_is_refused_naming_the_file_and_the_previous_good_one(saved_twice):
    good = saved_twice.read_bytes()
    generator = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 8 * len(good), (300,), generator=generator).tolist()
    bits += list(range(8 * 100))                                    # every bit of the header
    for bit in bits:
        flipped = bytearray(good)
        flipped[bit // 8] ^= 1 << (bit % 8)
        saved_twice.write_bytes(bytes(flipped))
        with pytest.raises(CorruptCheckpoint) as error:
            load_checkpoint(saved_twice)
        message = str(error.value)
        assert message.startswith(f"checkpoint {saved_twice} is ")
        assert message.endswith(f"; the previous good checkpoint is "
                                f"{checkpoints.previous_checkpoint(saved_twice)}")
    saved_twice.write_bytes(good)
    assert load_checkpoint(saved_twice)["step"] == 2


def test_every_truncation_raises_a_value_error_naming_the_file(saved_twice):
    good = saved_twice.read_bytes()
    for length in [*range(0, 120), *range(120, len(good), 97)]:
        saved_twice.write_bytes(good[:length])
        with pytest.raises(ValueError, match=f"checkpoint {saved_twice} is (truncated|corrupt)"):
            load_checkpoint(saved_twice)


def test_a_corrupt_checkpoint_without_a_good_previous_one_says_so(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1}, path)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="checksum mismatch.; there is no previous good checkpoint"):
        load_checkpoint(path)


def test_a_missing_checkpoint_points_to_the_previous_good_one(saved_twice):
    saved_twice.unlink()
    with pytest.raises(FileNotFoundError, match="not found; the previous good checkpoint is "
                                                ".*checkpoint.prev.pt"):
        load_checkpoint(saved_twice)


def test_a_folder_in_place_of_a_checkpoint_raises_a_value_error_naming_it(tmp_path):
    (tmp_path / "checkpoint.pt").mkdir()
    with pytest.raises(ValueError, match="checkpoint .*checkpoint.pt cannot be read"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_a_new_checkpoint_that_does_not_verify_replaces_nothing(saved_twice, monkeypatch):
    before = saved_twice.read_bytes()
    previous_before = checkpoints.previous_checkpoint(saved_twice).read_bytes()
    write = checkpoints._write_temporary

    def write_with_a_flipped_bit(data, path):
        damaged = bytearray(data)
        damaged[-5] ^= 1
        return write(bytes(damaged), path)
    monkeypatch.setattr(checkpoints, "_write_temporary", write_with_a_flipped_bit)
    with pytest.raises(CorruptCheckpoint, match=f"checkpoint {saved_twice} was left as it was: "
                                                f"the new file written for it did not verify "
                                                f"\\(.*checksum mismatch\\)"):
        save_checkpoint({"step": 3}, saved_twice)
    assert saved_twice.read_bytes() == before
    assert checkpoints.previous_checkpoint(saved_twice).read_bytes() == previous_before
    assert sorted(p.name for p in saved_twice.parent.iterdir()) == ["checkpoint.prev.pt",
                                                                     "checkpoint.pt"]


def test_the_folder_is_fsynced_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append(f"rename to {os.path.basename(dst)}")
        real_replace(src, dst)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint({"step": 1}, tmp_path / "checkpoint.pt")
    assert events == ["fsync file", "rename to checkpoint.pt", "fsync folder"]


KILLED_SAVER = textwrap.dedent("""
    import sys, torch
    from capsutil.checkpoints import save_checkpoint
    path = sys.argv[1]
    weights = torch.randn(400_000)
    step = 0
    while True:
        step += 1
        save_checkpoint({"step": step, "weights": weights}, path)
        if step == 3:
            print("saving", flush=True)
""")


def test_a_save_killed_at_a_random_moment_leaves_a_good_checkpoint_and_its_temporaries_go(
        tmp_path):
    path = tmp_path / "checkpoint.pt"
    saver = subprocess.Popen([sys.executable, "-c", KILLED_SAVER, str(path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert saver.stdout.readline() == "saving\n"
        delay = torch.rand(1, generator=torch.Generator().manual_seed(1)).item()
        subprocess.run(["sleep", f"{0.05 + 0.3 * delay:.3f}"], check=True)
    finally:
        saver.send_signal(signal.SIGKILL)
        saver.wait()
    state = load_checkpoint(path)
    assert state["step"] >= 3
    with checkpoints.claimed_run_directory(tmp_path, {"checkpoint.pt": 0}):
        assert checkpoints.stale_temporaries(path) == []
    assert load_checkpoint(path)["step"] == state["step"]


def test_claiming_a_folder_removes_only_the_temporaries_of_its_checkpoints(tmp_path):
    stale = [tmp_path / ".checkpoint.pt.k3j9x.tmp", tmp_path / ".best.pt.a0b1c2.tmp",
             tmp_path / ".checkpoint.prev.pt.link.tmp"]
    unrelated = tmp_path / ".notes.txt.q1.tmp"
    for file in (*stale, unrelated):
        file.write_bytes(b"half a file")
    with checkpoints.claimed_run_directory(tmp_path, {"checkpoint.pt": 10, "best.pt": 10}):
        assert not any(file.exists() for file in stale)
    assert unrelated.exists()
