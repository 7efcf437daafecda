"""sgn_lab.atomic.atomic_write: all or nothing, no temporary left behind, the user's umask."""

import os
import stat

import pytest

from sgn_lab.atomic import atomic_write


def test_writes_through_a_rename_with_the_umask_and_creates_the_folder(tmp_path):
    old = os.umask(0o022)
    try:
        out = atomic_write(tmp_path / "sub" / "a.txt", lambda f: f.write(b"hello"))
    finally:
        os.umask(old)
    assert out.read_bytes() == b"hello"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert [p.name for p in out.parent.iterdir()] == ["a.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_file_in_the_way_is_an_oserror(tmp_path):
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(OSError):
        atomic_write(tmp_path / "blocker" / "a.txt", lambda f: f.write(b""))
