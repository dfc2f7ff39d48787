"""A free TCP port on this host, for a single-host rendezvous (tests, benchmarks that spawn their own ranks)."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port that was free on 127.0.0.1 when asked (the OS picks it; another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
