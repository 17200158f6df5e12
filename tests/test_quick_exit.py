"""exit_process: the exit status, atexit handlers and buffered output are what sys.exit gives."""

import subprocess
import sys

from conftest import ROOT

SCRIPT = """
import atexit, sys
from ds_upcycle.quick_exit import exit_process
atexit.register(lambda: print("atexit ran", file=sys.stderr))
with open(sys.argv[1], "w") as f:
    f.write("written")
class Cycle:
    def __init__(self):
        self.me = self
keep = Cycle()
sys.stdout.write("buffered, no newline")
exit_process(int(sys.argv[2]))
"""


def test_exit_status_atexit_and_buffered_output_survive(tmp_path):
    for status in (0, 3):
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "out"), str(status)], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == status
        assert proc.stdout == "buffered, no newline" and proc.stderr == "atexit ran\n"
        assert (tmp_path / "out").read_text() == "written"
