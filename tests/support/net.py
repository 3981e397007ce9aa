"""Loopback sockets for test servers, bound to port 0 so the kernel picks a port no one else
holds: the server takes the socket as it is, and nothing can grab the port in between (the
race of "find a free port, release it, bind it later")."""
from __future__ import annotations

import socket


def listening_socket(backlog: int = 128) -> socket.socket:
    """A TCP socket on 127.0.0.1, on a port the kernel chose, already listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


def refusing_socket() -> socket.socket:
    """A socket bound to a loopback port but not listening: while it is held, connections to
    that port are refused (a dead service, with no chance of someone else answering there)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def port_of(sock: socket.socket) -> int:
    return sock.getsockname()[1]
