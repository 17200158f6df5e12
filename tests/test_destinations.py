"""Outputs are checked before any work: a destination that cannot be written is refused in one line,
exit 2, before a source is read, and nothing is left behind.

Two kinds of unwritable destination: one under a regular file, one in a folder where nothing can be
created (a read-only directory; for root, whom permission bits do not stop, a read-only file system).
The sources given are paths that do not exist: a refusal that names the destination, not the
missing source, shows the destination was checked first.
"""

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from ds_upcycle.atomic import check_writable
from ds_upcycle.cli import main
from ds_upcycle.errors import UserError

from conftest import ROOT, train_refusal


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A directory in which nothing can be created."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        yield folder
        folder.chmod(stat.S_IRWXU)
        return
    for candidate in (Path("/sys"), Path("/proc")):
        try:
            os.rmdir(os.path.join(candidate, "ds-upcycle-probe"))
        except OSError:
            pass
        try:
            os.mkdir(candidate / "ds-upcycle-probe")
        except OSError:
            yield candidate
            return
        os.rmdir(candidate / "ds-upcycle-probe")
    pytest.fail("no read-only directory to test with on this machine")


@pytest.fixture
def regular_file(tmp_path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a directory\n")
    return path


def listing(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_check_writable(tmp_path, regular_file, unwritable):
    check_writable(tmp_path / "new" / "deeper" / "out")  # missing parents are fine: they will be made
    assert listing(tmp_path) == ["a-file"]  # the probe leaves nothing
    with pytest.raises(UserError, match=f"{regular_file} is a file, not a directory"):
        check_writable(regular_file / "sub" / "out")
    with pytest.raises(UserError, match=f"{unwritable} is not writable"):
        check_writable(unwritable / "out")


COMMANDS = {
    "export": lambda src, dst: ["export", src, dst],
    "import": lambda src, dst: ["import", src, dst],
    "expand": lambda src, dst: ["expand", src, dst, "-m", "2"],
    "reproduce": lambda src, dst: ["reproduce", "--config", "tiny", "--out", dst],
    "compare": lambda src, dst: ["compare", src, "--output-dir", dst],
    "compare --plot": lambda src, dst: ["compare", src, "--plot", f"{dst}/plot.png"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("where", ["under a file", "unwritable"])
def test_an_unwritable_destination_is_refused_before_any_work(command, where, tmp_path, regular_file, unwritable):
    dst = (regular_file if where == "under a file" else unwritable) / "out"
    before = listing(tmp_path)
    result = CliRunner().invoke(main, COMMANDS[command](str(tmp_path / "no-such-source"), str(dst)))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ds-upcycle: error: cannot write "), result.output
    assert str(dst) in lines[0] and "no-such-source" not in lines[0]
    assert listing(tmp_path) == before


def test_train_refuses_an_unwritable_save_before_training(regular_file, tmp_path, monkeypatch):
    args = ["--deepspeed_config", str(ROOT / "ds_configs" / "zero2_fp32.json"), "--save", str(regular_file / "run"),
            "--steps", "1", "--data-cache", str(tmp_path / "cache")]
    proc = train_refusal(args, monkeypatch)
    assert proc.returncode == 2 and proc.stderr == (f"train.py: error: cannot write --save directory {regular_file / 'run'}: "
                                       f"{regular_file} is a file, not a directory\n")
    assert not (tmp_path / "cache").exists()  # no data was prepared
