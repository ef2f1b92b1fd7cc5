"""Pick rendezvous ports that do not collide with other jobs on the same host."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_port(job_id: int, base: int = 20000, span: int = 20000) -> int:
    """A port derived from a scheduler job id, so concurrent jobs on shared nodes differ."""
    return base + job_id % span
