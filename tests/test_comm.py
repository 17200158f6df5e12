"""Rendezvous ports: drawn where no outgoing connection can take them before the job binds them."""

import socket

from ds_upcycle.comm import _ephemeral_low, free_port


def test_free_port_is_below_the_ephemeral_range_and_bindable():
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= p < _ephemeral_low() for p in ports)
    assert len(ports) > 1  # drawn at random: side-by-side jobs do not all pick one port
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
