"""Pick rendezvous ports that do not collide with other jobs on the same host."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# below Linux's ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by default), where an outgoing
# connection of any process could already hold the port the rendezvous store must bind
PORT_BASE, PORT_SPAN = 20000, 12000
REQUEUE_STRIDE = 7919  # a prime: a requeued job (same id) moves to another port


def job_port(job_id: int, restart_count: int = 0) -> int:
    """A port derived from a scheduler job id and its requeue count (slurm/env/common.sh computes the same),
    so concurrent jobs on shared nodes differ and a requeued job does not meet its old port in TIME_WAIT."""
    return PORT_BASE + (job_id + REQUEUE_STRIDE * restart_count) % PORT_SPAN
