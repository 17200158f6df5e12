"""Rendezvous ports: drawn where no outgoing connection can take them before the job binds them."""

import os
import socket
import time

from ds_upcycle.cache import STALE_BUILD_LOCK_S, clear_stale_build_lock
from ds_upcycle.comm import _ephemeral_low, free_port


def test_free_port_is_below_the_ephemeral_range_and_bindable():
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= p < _ephemeral_low() for p in ports)
    assert len(ports) > 1  # drawn at random: side-by-side jobs do not all pick one port
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_build_lock_left_by_a_killed_process_is_cleared_and_a_live_one_kept(tmp_path):
    """torch waits for ever on an op folder's lock file; a build takes about a minute."""
    lock = tmp_path / "lock"
    lock.touch()
    assert not clear_stale_build_lock(tmp_path) and lock.exists()   # a build under way
    old = time.time() - STALE_BUILD_LOCK_S - 1
    os.utime(lock, (old, old))
    assert clear_stale_build_lock(tmp_path) and not lock.exists()
    assert not clear_stale_build_lock(tmp_path)                     # no lock: nothing to do
