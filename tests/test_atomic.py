"""Outputs that appear whole or not at all (atomic.staged_dir), checked on the file system."""

import pytest

from ds_upcycle.atomic import staged_dir
from ds_upcycle.errors import UserError


def test_a_new_directory_appears_only_when_complete(tmp_path):
    dst = tmp_path / "out"
    with staged_dir(dst) as tmp:
        (tmp / "a").write_text("1")
        assert not dst.exists() and tmp.parent == tmp_path and tmp.name.startswith(".out.")
    assert (dst / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failure_leaves_nothing_and_the_old_output_stays(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old").write_text("kept")
    for error in (RuntimeError("halfway"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with staged_dir(dst, "replace") as tmp:
                (tmp / "new").write_text("partial")
                raise error
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (dst / "old").read_text() == "kept"


def test_what_happens_to_an_existing_output(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        with staged_dir(dst):
            raise AssertionError("the block must not run")
    with staged_dir(dst, "replace") as tmp:
        (tmp / "new").write_text("y")
    assert [p.name for p in dst.iterdir()] == ["new"]
    with staged_dir(dst, "keep") as tmp:  # a cache entry published first by someone else is kept
        (tmp / "other").write_text("z")
    assert [p.name for p in dst.iterdir()] == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged_dir(empty) as tmp:  # an empty directory counts as absent
        (tmp / "a").write_text("1")
    assert [p.name for p in empty.iterdir()] == ["a"]
